"""Datasets: column checks, lazy image transforms, collation and the built-in Fashion-MNIST default."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import DatasetError, ImageLoadError, LabelError
from .augment import AugmentationConfig, build_image_transforms, sample_seed
from .dataset_shapes import as_pil_image, check_no_missing_images, check_transformable, is_iterable_dataset
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    balanced_subset,
    find_idx,
    load_fashion_mnist,
    read_idx,
)
from .images import to_rgb
from .views import ImageView

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "PerSampleSeededDataset",
    "TensorBatchCollator",
    "balanced_subset",
    "collate_images",
    "dataset_class_names",
    "find_idx",
    "load_fashion_mnist",
    "prepared_info",
    "prepared_views",
    "read_idx",
    "with_image_transforms",
]

logger = logging.getLogger(__name__)


def normalise_class_name(name: str) -> str:
    """Class names compare equal ignoring case, spaces, ``_`` and ``-`` (and Unicode's equivalent spellings:
    composed or decomposed accents, full-width letters)."""
    return re.sub(r"[\s_\-]+", " ", unicodedata.normalize("NFKC", str(name)).strip().casefold())


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


def check_columns(dataset: Any, image_column: str, label_column: str | None, what: str = "dataset") -> None:
    """Fails early, naming the available columns, when the image or label column is missing or the dataset is
    empty."""
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        missing = [c for c in (image_column, label_column) if c and c not in columns]
        if missing:
            raise DatasetError(
                f"The {what} has no column {', '.join(repr(m) for m in missing)}; its columns are {columns}. "
                "Set --image_column_name / --label_column_name (or rename the columns)."
            )
    check_not_empty(dataset, what)


def check_not_empty(dataset: Any, what: str = "dataset") -> None:
    """Raises :class:`DatasetError` for a dataset with no rows (a sized one; iterable datasets are not counted)."""
    try:
        size = len(dataset)
    except TypeError:
        return
    if size == 0:
        raise DatasetError(
            f"The {what} is empty (0 rows). Check the data path / split name, the filters applied to it, and "
            "--max_train_samples / --max_eval_samples."
        )


def prepared_info(dataset: Any) -> dict[str, Any] | None:
    """What :func:`with_image_transforms` recorded on ``dataset`` (kept through ``select``, ``shuffle`` and
    splits): ``student_view``, ``teacher_view``, ``train``, ``image_column``, ``label_column``,
    ``class_names``, ``augmentation`` (the :class:`~pat_hf.data.augment.AugmentationConfig` of training data, else
    None); None for data prepared otherwise."""
    fmt = getattr(dataset, "format", None)
    transform = fmt.get("format_kwargs", {}).get("transform") if isinstance(fmt, dict) else None
    # A streamed (IterableDataset) one carries it as an attribute, lost by its shuffle() / take().
    info = getattr(transform, "pat_hf", None) or getattr(dataset, "pat_hf_info", None)
    return info if isinstance(info, dict) else None


def prepared_views(train_dataset: Any, eval_dataset: Any = None) -> dict[str, ImageView | None]:
    """The views the data was prepared with: ``student`` and ``teacher`` (training data), ``eval_student``."""
    train, evaluation = prepared_info(train_dataset) or {}, prepared_info(eval_dataset) or {}
    teacher, eval_teacher = train.get("teacher_view"), evaluation.get("teacher_view")
    if teacher is not None and eval_teacher is not None and not teacher.agrees_with(eval_teacher):
        raise ValueError(
            f"The training data was prepared for the teacher with {teacher.describe()} but the evaluation data with "
            f"{eval_teacher.describe()}: one run must use one teacher view. Build both with the same ImageView."
        )
    return {
        "student": train.get("student_view"),
        "teacher": teacher if teacher is not None else eval_teacher,
        "eval_student": evaluation.get("student_view"),
    }


def _label_encoder(info: dict[str, Any]):
    cache: dict[str, Any] = {}

    def encode(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        names = info.get("class_names")
        if not names:
            raise LabelError(
                f"Label {value!r} of column {info['label_column']!r} is a string: give the class names "
                "(with_image_transforms(..., class_names=...)) so strings can be mapped to class indices."
            )
        if cache.get("names") is not names:
            cache["names"], cache["lookup"] = names, {normalise_class_name(n): i for i, n in enumerate(names)}
        index = cache["lookup"].get(normalise_class_name(value))
        if index is None:
            raise LabelError(f"Label {value!r} of column {info['label_column']!r} is not one of the classes {names}.")
        return index

    return encode


def _find_row(raw: Any, column: str, value: dict[str, Any]) -> int | None:
    """The row of ``raw`` (images not decoded) holding ``value``; only called once an image failed."""
    for start in range(0, len(raw), 1000):
        for offset, item in enumerate(raw[start : start + 1000][column]):
            if item == value:
                return start + offset
    return None


def with_image_transforms(
    dataset: Any,
    student_view: ImageView,
    teacher_view: ImageView | None = None,
    *,
    train: bool,
    image_column: str = "image",
    label_column: str | None = "label",
    augmentation: AugmentationConfig | None = None,
    class_names: Sequence[str] | None = None,
    **augmentation_options: Any,
) -> Any:
    """Attaches lazy transforms producing ``pixel_values`` (one uint8 image per sample) and ``labels``.

    Training: timm's ``create_transform`` augmentation with the settings of ``augmentation``, every random draw
    (crop, flip, RandAugment, colour jitter, random-erasing box and fill) made once per image at the larger of the
    two views' sizes (see :mod:`pat_hf.data.augment`); the sample is that one uint8 (3, H, W) image (plus the drawn
    erasing boxes, ``erase``, when random erasing is on). The trainer makes each model's view from it on the
    device (resize, normalisation, erasing), before Mixup / CutMix (``mixup_alpha`` / ``cutmix_alpha`` in
    :class:`~pat_hf.PATTrainingArguments`). Evaluation: the student's resize + centre crop, as uint8, and with a
    teacher view the teacher's own (``teacher_pixel_values``, uint8, for ``eval_loss_kd``).

    The views and the augmentation are recorded on the dataset (:func:`prepared_info`): the trainer checks them
    against the teacher's and records them in its checkpoints and export. An image that cannot be decoded raises
    :class:`pat_hf.errors.ImageLoadError` naming its file (or its row).

    Args:
        dataset: A `datasets.Dataset` or ``IterableDataset`` (streaming) with an image column and a label column.
            Images may be PIL images of any mode (:func:`pat_hf.data.images.to_rgb`), arrays, file paths or bytes
            (:mod:`pat_hf.data.dataset_shapes`).
        student_view: The student's view (``trainer``-independent: see :meth:`ImageView.from_timm`).
        teacher_view: The teacher's view; None without a teacher. In training only its size counts (the image
            is made at the larger size); in evaluation it adds the teacher's own view of each image.
        train: Augment (training) or resize + centre-crop (evaluation).
        image_column: Name of the image column.
        label_column: Name of the label column (None for unlabelled data).
        augmentation: The training augmentation's settings (:class:`pat_hf.data.augment.AugmentationConfig`); None:
            built from ``augmentation_options``.
        class_names: Class names in output order: string labels are mapped to their index by name (case, spaces,
            ``_`` and ``-`` ignored). The trainer sets them for string labels when they are not given.
        **augmentation_options: The former keyword arguments (``min_crop_scale``, ``hflip``, ``crop_ratio``,
            ``train_interpolation``, ``auto_augment``, ``color_jitter``, ``re_prob``, ``re_mode``, ``re_count``,
            ``per_sample_seed``): the fields of the :class:`~pat_hf.data.augment.AugmentationConfig` built when
            ``augmentation`` is None.

    Returns:
        The dataset with ``set_transform`` applied (a new view; the original is unchanged).
    """
    check_transformable(dataset)
    check_columns(dataset, image_column, label_column)
    check_no_missing_images(dataset, image_column)
    streaming = is_iterable_dataset(dataset)
    if augmentation is None:
        augmentation = AugmentationConfig(**augmentation_options)
    elif augmentation_options:
        raise TypeError(f"Give either augmentation= or its keywords, not both ({sorted(augmentation_options)}).")
    transform = build_image_transforms(student_view, teacher_view, train=train, augmentation=augmentation)
    decoder = raw = None
    feature = (getattr(dataset, "features", None) or {}).get(image_column)
    if type(feature).__name__ == "Image" and getattr(feature, "decode", False) and hasattr(dataset, "cast_column"):
        # Decode here rather than inside `datasets`, so that a broken image is reported with its file or row.
        import datasets

        raw = dataset.cast_column(image_column, datasets.Image(decode=False, mode=getattr(feature, "mode", None)))
        dataset, decoder = raw, feature
        if getattr(feature, "mode", None) == "RGB":
            # datasets' own conversion to RGB clips 16-bit images to white: decode as stored, then to_rgb.
            decoder = datasets.Image()
    info: dict[str, Any] = {
        "student_view": student_view,
        "teacher_view": teacher_view,
        "train": train,
        "image_column": image_column,
        "label_column": label_column,
        "class_names": list(class_names) if class_names else None,
        "augmentation": augmentation if train else None,
    }
    encode = _label_encoder(info)

    def load(value: Any) -> Any:
        if decoder is None or value is None:
            # Arrays, paths, bytes ... (dataset_shapes); a missing image is refused naming the column.
            return as_pil_image(value, image_column)
        try:
            return decoder.decode_example(value)
        except Exception as err:
            where = f"file {value['path']!r}" if isinstance(value, dict) and value.get("path") else None
            if where is None and raw is not None and not streaming:
                row = _find_row(raw.with_format(None), image_column, value)
                where = f"row {row}" if row is not None else "a row"
            raise ImageLoadError(
                f"Cannot read the image in {where} of column {image_column!r} ({type(err).__name__}: {err}). "
                "The file is truncated or not an image: replace it, or remove it from the dataset."
            ) from err

    def apply(batch: dict[str, list[Any]], seeds: Sequence[int] | None = None) -> dict[str, list[Any]]:
        # seeds: one per row, from PerSampleSeededDataset (the trainer's loader); None: the global generators.
        missing = [c for c in (image_column, label_column) if c and c not in batch]
        if missing:  # a streamed dataset whose columns were not known beforehand
            raise DatasetError(f"The dataset has no column {missing}; its rows hold {sorted(batch)}.")
        images = batch[image_column]
        seeds = seeds if seeds is not None else [None] * len(images)
        views = [transform(to_rgb(load(image)), seed=seed) for image, seed in zip(images, seeds)]
        out: dict[str, list[Any]] = {key: [v[key] for v in views] for key in (views[0] if views else ("pixel_values",))}
        if label_column:
            out["labels"] = [encode(value) for value in batch[label_column]]
        return out

    apply.pat_hf = info
    if streaming:
        # Streaming: no set_transform; the same function runs lazily, batch by batch, as the data is read.
        drop = [image_column] + ([label_column] if label_column and label_column != "labels" else [])
        dataset = dataset.map(apply, batched=True, remove_columns=drop)
        dataset.pat_hf_info = info
        return dataset
    dataset = dataset.with_transform(apply)
    return dataset


def collate_images(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stacks ``pixel_values`` (and ``teacher_pixel_values``, ``erase``, ``labels`` when present) into a batch.

    uint8 images stay uint8 (one byte per pixel through the loader, pinned memory and the copy to the device);
    ``erase`` (random-erasing boxes, int64 (B, re_count, 6)) is a NumPy array, so it stays on the host."""
    from torch.utils.data import default_collate

    # default_collate stacks straight into shared memory in a data-loader worker (no second copy to hand it over).
    batch = {"pixel_values": default_collate([e["pixel_values"] for e in examples])}
    if "teacher_pixel_values" in examples[0]:
        batch["teacher_pixel_values"] = default_collate([e["teacher_pixel_values"] for e in examples])
    if "erase" in examples[0]:
        # A NumPy array: Trainer moves tensors to the device, and the boxes are read on the host (no device sync).
        batch["erase"] = np.stack([np.asarray(e["erase"]) for e in examples])
    label_key = "labels" if "labels" in examples[0] else "label" if "label" in examples[0] else None
    if label_key is not None:
        batch["labels"] = torch.tensor([int(e[label_key]) for e in examples], dtype=torch.long)
    return batch


class PerSampleSeededDataset(torch.utils.data.Dataset):
    """A training dataset prepared by :func:`with_image_transforms` whose random draws are seeded per sample.

    Sample ``i`` of epoch ``e`` is augmented with generators seeded from ``(run_seed, e, i)``
    (:func:`pat_hf.data.augment.sample_seed`), so its pixels are the same whichever data-loader worker (or process, or
    resumed run) makes them. The trainer wraps its training data in it when the data's
    :class:`~pat_hf.data.augment.AugmentationConfig` has ``per_sample_seed`` (the default) and sets the epoch at
    the start of each epoch (:meth:`set_epoch`). The epoch lives in shared memory, so persistent data-loader
    workers see it too.

    Args:
        dataset: The prepared `datasets.Dataset` (its transform is called with the seeds).
        run_seed: The run's seed (``TrainingArguments.seed``).
    """

    def __init__(self, dataset: Any, run_seed: int) -> None:
        fmt = getattr(dataset, "format", None) or {}
        self.apply = fmt.get("format_kwargs", {}).get("transform")
        if getattr(self.apply, "pat_hf", None) is None:
            raise ValueError("PerSampleSeededDataset needs a dataset prepared by pat_hf.with_image_transforms.")
        self.rows = dataset.with_format(None)  # raw rows; `apply` decodes and augments them
        self.run_seed = int(run_seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch the next samples are drawn for."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch (accelerate calls this; so does the trainer's epoch callback)."""
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        epoch = self.epoch
        out = self.apply(self.rows[indices], seeds=[sample_seed(self.run_seed, epoch, i) for i in indices])
        return [{key: values[j] for key, values in out.items()} for j in range(len(indices))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


class TensorBatchCollator:
    """Builds ``pixel_values`` for a whole batch of grey uint8 images on tensors, without PIL: the images are
    centred on an ``image_size`` canvas (28 -> 32 by default), then (training) cropped at random from a
    ``pad``-pixel zero-padded copy and flipped horizontally, then scaled to [0, 1], normalised and replicated to
    3 channels. Per-image PIL transforms would bottleneck a GPU on such small images.

    Items are dicts with ``image`` ((H, W) uint8 tensor), ``labels`` (int) and ``augment`` (bool; the first
    item's decides for the batch). When teacher and student share this view (same size and statistics), the
    trainer derives ``teacher_pixel_values`` from the same augmented batch at no cost.

    Args:
        pad: Padding of the random crop (pixels on each side).
        mean: Normalisation mean (one grey value).
        std: Normalisation standard deviation.
        image_size: Side of the square output (at least the images' side).
    """

    def __init__(
        self,
        pad: int = 4,
        mean: float = FASHION_MNIST_MEAN[0],
        std: float = FASHION_MNIST_STD[0],
        image_size: int = 32,
    ) -> None:
        self.pad, self.mean, self.std, self.image_size = pad, mean, std, image_size

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = torch.stack([e["image"] for e in examples])  # (B, H, W) uint8
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        size, (height, width) = self.image_size, images.shape[-2:]
        if height > size or width > size:
            raise ValueError(f"{height}x{width} images do not fit in image_size {size}.")
        extra = self.pad if examples[0]["augment"] else 0
        top, left = (size - height) // 2 + extra, (size - width) // 2 + extra
        bottom, right = size - height + 2 * extra - top, size - width + 2 * extra - left
        x = torch.nn.functional.pad(images, (left, right, top, bottom))
        if examples[0]["augment"]:
            batch = x.shape[0]
            span = 2 * self.pad + 1
            top_shift = torch.randint(0, span, (batch, 1, 1))
            left_shift = torch.randint(0, span, (batch, 1, 1))
            steps = torch.arange(size)
            rows = (top_shift + steps.view(1, -1, 1)).expand(batch, size, size)
            cols = (left_shift + steps.view(1, 1, -1)).expand(batch, size, size)
            x = x[torch.arange(batch).view(-1, 1, 1), rows, cols]
            flip = torch.rand(batch) < 0.5
            x = torch.where(flip.view(-1, 1, 1), x.flip(-1), x)
        x = (x.float().div_(255.0) - self.mean) / self.std
        return {"pixel_values": x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), "labels": labels}
