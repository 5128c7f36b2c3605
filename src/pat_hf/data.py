"""Datasets: column checks, lazy image transforms, collation and the built-in Fashion-MNIST default."""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .preprocessing import ImageView, build_image_transforms

__all__ = [
    "FASHION_MNIST_CLASSES",
    "collate_images",
    "dataset_class_names",
    "load_fashion_mnist",
    "with_image_transforms",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def dataset_class_names(dataset: Any, label_column: str | None = None) -> list[str] | None:
    """Class names from a `datasets` ClassLabel column ("labels" or "label" unless given), else None."""
    features = getattr(dataset, "features", None)
    if not features:
        return None
    columns = [label_column] if label_column else ["labels", "label"]
    for column in columns:
        feature = features.get(column)
        names = getattr(feature, "names", None)
        if names:
            return list(names)
    return None


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # unsigned byte data
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}).")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: str, stem: str) -> str | None:
    for name in (f"{stem}.gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def load_fashion_mnist(split: str = "train", root: str | None = None) -> Any:
    """Fashion-MNIST as a `datasets.Dataset` with ``image`` (PIL, 28×28 grey) and ``label`` (ClassLabel).

    Reads the IDX files of Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``,
    or ``root``); without them it falls back to the Hub copy ``zalando-datasets/fashion_mnist``.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        root: Folder holding the IDX files.

    Raises:
        FileNotFoundError: When neither the files nor the Hub are available, saying how to install them.
    """
    import datasets

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = root or os.environ.get("PAT_HF_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    prefix = "train" if split == "train" else "t10k"
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)})
    if images_path and labels_path:
        images = _read_idx(images_path)
        labels = _read_idx(labels_path).astype(np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{images_path} and {labels_path} disagree on the number of examples.")
        from PIL import Image

        pil = [Image.fromarray(img, mode="L") for img in images]
        return datasets.Dataset.from_dict({"image": pil, "label": labels.tolist()}, features=features)
    try:
        ds = datasets.load_dataset(FASHION_MNIST_HUB_ID, split=split)
    except Exception as err:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root} and the Hub copy {FASHION_MNIST_HUB_ID!r} is unreachable ({err}). "
            "Install Debian's package: `apt-get install dataset-fashion-mnist` (or set PAT_HF_FASHION_MNIST_DIR)."
        ) from err
    return ds.cast(features)


def check_columns(dataset: Any, image_column: str, label_column: str | None, what: str = "dataset") -> None:
    """Fails early, naming the available columns, when the image or label column is missing."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return
    missing = [c for c in (image_column, label_column) if c and c not in columns]
    if missing:
        raise ValueError(
            f"The {what} has no column {', '.join(repr(m) for m in missing)}; its columns are {columns}. "
            "Set --image_column_name / --label_column_name (or rename the columns)."
        )


def with_image_transforms(
    dataset: Any,
    student_view: ImageView,
    teacher_view: ImageView | None = None,
    *,
    train: bool,
    image_column: str = "image",
    label_column: str | None = "label",
    min_crop_scale: float = 0.08,
    hflip: bool = True,
) -> Any:
    """Attaches lazy transforms producing ``pixel_values``, ``teacher_pixel_values`` and ``labels``.

    Args:
        dataset: A `datasets.Dataset` with an image column (PIL images, any mode) and a label column.
        student_view: The student's view (``trainer``-independent: see :meth:`ImageView.from_timm`).
        teacher_view: The teacher's view (training only); None without a teacher.
        train: Augment (training) or resize + centre-crop (evaluation).
        image_column: Name of the image column.
        label_column: Name of the label column (None for unlabelled data).
        min_crop_scale: Lower bound of the random-resized-crop area fraction.
        hflip: Random horizontal flips during training.

    Returns:
        The dataset with ``set_transform`` applied (a new view; the original is unchanged).
    """
    check_columns(dataset, image_column, label_column)
    transform = build_image_transforms(
        student_view, teacher_view, train=train, min_crop_scale=min_crop_scale, hflip=hflip
    )

    def apply(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"pixel_values": []}
        views = [transform(image) for image in batch[image_column]]
        out["pixel_values"] = [v["pixel_values"] for v in views]
        if views and "teacher_pixel_values" in views[0]:
            out["teacher_pixel_values"] = [v["teacher_pixel_values"] for v in views]
        if label_column:
            out["labels"] = list(batch[label_column])
        return out

    dataset = dataset.with_transform(apply)
    return dataset


def collate_images(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks ``pixel_values`` (and ``teacher_pixel_values``, ``labels`` when present) into a batch."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
    if "teacher_pixel_values" in examples[0]:
        batch["teacher_pixel_values"] = torch.stack([e["teacher_pixel_values"] for e in examples])
    label_key = "labels" if "labels" in examples[0] else "label" if "label" in examples[0] else None
    if label_key is not None:
        batch["labels"] = torch.tensor([int(e[label_key]) for e in examples], dtype=torch.long)
    return batch
