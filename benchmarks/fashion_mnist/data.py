"""The study's data: Fashion-MNIST as uint8 tensors, the fixed class-balanced student subset and validation
split, and a dataset whose items :class:`pat_hf.data.TensorBatchCollator` turns into batches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pat_hf.data.datasets import FASHION_MNIST_DIR, balanced_subset, find_idx, read_idx

from .config import StudyConfig


@dataclass
class StudyData:
    """Fashion-MNIST as uint8 tensors and the fixed index splits of the study."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    subset: np.ndarray
    val: np.ndarray

    def describe(self) -> dict[str, Any]:
        """Sizes and a hash of the split indices (the report shows that all runs used the same splits)."""
        digest = hashlib.sha256(self.subset.tobytes() + self.val.tobytes()).hexdigest()[:12]
        return {
            "train_images": len(self.train_labels),
            "test_images": len(self.test_labels),
            "subset_images": len(self.subset),
            "val_images": len(self.val),
            "split_hash": digest,
        }


class _LabelColumn:
    """Just enough of a `datasets.Dataset` for :func:`pat_hf.data.balanced_subset`: a label column and
    ``select`` returning the chosen indices."""

    def __init__(self, labels: np.ndarray, indices: np.ndarray) -> None:
        self.labels, self.indices = labels, indices

    def __getitem__(self, column: str) -> np.ndarray:
        return self.labels[self.indices]

    def select(self, positions: list[int]) -> np.ndarray:
        return self.indices[np.asarray(positions, dtype=np.int64)]


def load_study_data(config: StudyConfig) -> StudyData:
    """Reads the IDX files and draws the splits: subset and validation never overlap, and neither depends on
    the student seed (every run of the study trains on the same images).

    Raises:
        FileNotFoundError: When the IDX files are missing, saying how to install them.
    """
    root = config.data_dir or os.environ.get("PAT_HF_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, stem in (("images", f"{prefix}-images-idx3-ubyte"), ("labels", f"{prefix}-labels-idx1-ubyte")):
            path = find_idx(root, stem)
            if path is None:
                raise FileNotFoundError(
                    f"{stem}(.gz) not found in {root}. Install Debian's dataset-fashion-mnist "
                    "(`apt-get install dataset-fashion-mnist`) or set PAT_HF_FASHION_MNIST_DIR / --data-dir."
                )
            arrays[f"{split}_{kind}"] = read_idx(path)
    train_labels = arrays["train_labels"].astype(np.int64)
    everything = np.arange(len(train_labels))
    subset = balanced_subset(_LabelColumn(train_labels, everything), config.subset_size, seed=0)
    rest = np.setdiff1d(everything, subset)
    val = balanced_subset(_LabelColumn(train_labels, rest), config.val_size, seed=1)
    return StudyData(
        train_images=torch.from_numpy(arrays["train_images"].copy()),
        train_labels=torch.from_numpy(train_labels),
        test_images=torch.from_numpy(arrays["test_images"].copy()),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        subset=np.asarray(subset),
        val=np.asarray(val),
    )


class FashionTensors(torch.utils.data.Dataset):
    """Images (N, 28, 28) uint8 and labels; items are left raw for :class:`pat_hf.data.TensorBatchCollator`.

    Args:
        images: All images of the split.
        labels: All labels of the split.
        indices: The positions this dataset exposes (None: all).
        augment: Whether batches of this dataset are augmented (the collator reads it from the items).
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int] | None = None, augment: bool = False
    ) -> None:
        self.images, self.labels = images, labels
        self.indices = torch.as_tensor(np.asarray(indices if indices is not None else range(len(labels))))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[i])
        return {"image": self.images[j], "labels": int(self.labels[j]), "augment": self.augment}


class AugmentingCollator:
    """The study's "strong" recipe per image: timm's RandAugment (and the flip) on the 28 px image zero-padded to
    32 px, through :func:`pat_hf.data.augment.build_train_augmentation` with the crop switched off (scale and ratio 1:
    the whole image, as the flips recipe), then normalised; evaluation batches go through the tensor collator
    unchanged. Mixup / CutMix and the EMA run in the trainer (``PATTrainingArguments``).

    Args:
        auto_augment: timm's policy string, e.g. ``"rand-m9-mstd0.5-inc1"``.
        image_size: The padded side (32).
        mean: Normalisation mean (one grey value).
        std: Normalisation standard deviation.
    """

    def __init__(self, auto_augment: str, image_size: int, mean: float, std: float) -> None:
        from pat_hf import ImageView
        from pat_hf.data.augment import build_train_augmentation
        from pat_hf.data.datasets import TensorBatchCollator

        view = ImageView(size=(image_size, image_size), mean=(mean,) * 3, std=(std,) * 3)
        self.view = view
        self.transform = build_train_augmentation(
            view, None, min_crop_scale=1.0, crop_ratio=(1.0, 1.0), hflip=0.5, auto_augment=auto_augment
        )
        self.plain = TensorBatchCollator(pad=0, mean=mean, std=std, image_size=image_size)
        self.image_size = image_size

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples[0]["augment"]:
            return self.plain(examples)
        from PIL import Image

        views = []
        for example in examples:
            image = example["image"].numpy()
            border = (self.image_size - image.shape[0]) // 2
            views.append(self.transform(Image.fromarray(np.pad(image, border)).convert("RGB"))["pixel_values"])
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        from pat_hf.data.views import make_view

        # The transform gives uint8 images; this collator's batches are normalised with its own statistics (the
        # study's student and teacher share them), as timm's ToTensor + Normalize did here before.
        return {"pixel_values": make_view(torch.stack(views), self.view), "labels": labels}
