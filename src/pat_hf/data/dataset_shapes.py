"""The shapes of data `datasets` users pass every day, made into what the transforms expect, or refused by name.

- a split is expected, not a ``DatasetDict`` (refused, naming its splits);
- ``IterableDataset`` (streaming) is supported: :func:`pat_hf.data.with_image_transforms` maps it lazily;
- an image value may be a PIL image, a numpy array (HW or HWC) or a torch tensor (HW or CHW), of uint8, uint16,
  bool or float values, a file path (``str`` / ``pathlib.Path``), encoded bytes, or `datasets`' ``{"bytes", "path"}`` dict;
- a missing image (None) is refused naming the column and the rows (before training for an Arrow-backed
  dataset, when it is read for a streamed one); any other value is refused naming its type, the column and the row.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from ..errors import DatasetError, ImageLoadError

__all__ = [
    "as_pil_image",
    "check_no_missing_images",
    "check_prepared",
    "check_split",
    "check_transformable",
    "is_iterable_dataset",
]


def is_iterable_dataset(dataset: Any) -> bool:
    """A `datasets` ``IterableDataset`` (streaming: no length, no random access)."""
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return False
    return isinstance(dataset, IterableDataset)


def check_transformable(dataset: Any) -> None:
    """Refuses what :func:`pat_hf.data.with_image_transforms` cannot attach a transform to (a torch ``Dataset``,
    a list), saying how to make it a `datasets` one.

    Raises:
        DatasetError: Naming the type.
    """
    check_split(dataset)
    if hasattr(dataset, "with_transform") or is_iterable_dataset(dataset):
        return
    raise DatasetError(
        f"with_image_transforms takes a datasets.Dataset or IterableDataset, got {type(dataset).__name__}. Build one "
        "(datasets.Dataset.from_list / from_dict / from_generator, or IterableDataset.from_generator), or give the "
        "trainer your own dataset yielding 'pixel_values' (and 'teacher_pixel_values', 'labels') tensors."
    )


def check_split(dataset: Any, what: str = "dataset") -> None:
    """Refuses a ``DatasetDict`` / ``IterableDatasetDict`` where one split is expected, naming its splits.

    Raises:
        DatasetError: ``dataset`` is a dict of splits.
    """
    try:
        from datasets import DatasetDict, IterableDatasetDict
    except ImportError:  # pragma: no cover
        return
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        splits = list(dataset)
        pick = splits[0] if splits else "train"
        raise DatasetError(
            f"The {what} is a {type(dataset).__name__} with the splits {splits}, not one split: pass one of them, "
            f"e.g. dataset[{pick!r}]."
        )


def check_no_missing_images(dataset: Any, column: str, what: str = "dataset") -> None:
    """Refuses rows whose image is None, reading only the column's null count (no image is decoded). Datasets
    that are not Arrow-backed are checked when each image is read.

    Raises:
        DatasetError: Naming the column, the number of rows and the first of them.
    """
    table = getattr(dataset, "data", None)
    if table is None or not hasattr(table, "column") or column not in getattr(table, "column_names", ()):
        return
    array = table.column(column)
    if not array.null_count:
        return
    import pyarrow.compute as pc

    # An Arrow-backed dataset may be a view through select() / shuffle(): report the rows as the user indexes them.
    indices = getattr(dataset, "_indices", None)
    nulls = pc.is_null(array)
    if indices is not None:
        positions = indices.column(0)
        nulls = pc.take(nulls, positions)
    rows = pc.indices_nonzero(nulls).to_pylist() if hasattr(pc, "indices_nonzero") else []
    if not rows:
        return
    shown = ", ".join(str(r) for r in rows[:10]) + (" ..." if len(rows) > 10 else "")
    raise DatasetError(
        f"{len(rows)} rows of column {column!r} of the {what} have no image (None): rows {shown}. Remove them: "
        f"dataset = dataset.filter(lambda e: e[{column!r}] is not None)."
    )


def _array_to_pil(array: np.ndarray, where: str, channels_first: bool = False) -> Any:
    from PIL import Image

    # CHW -> HWC: a tensor is channels-first (torch's layout) when its first axis can be channels; an array only
    # when its last axis cannot (numpy's and PIL's layout is HWC).
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and (channels_first or array.shape[-1] not in (1, 3, 4)):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (2, 3, 4)) or 0 in array.shape:
        raise ImageLoadError(
            f"The array in {where} has shape {tuple(array.shape)}: an image is (H, W), (H, W, 1|2|3|4) (2: grey and "
            "alpha) or (1|3|4, H, W)."
        )
    kind = array.dtype.kind
    if kind == "b":
        array = array.astype(np.uint8) * 255
    if array.dtype == np.uint8:  # (H, W, 2) becomes "LA", composited by to_rgb like any image with transparency
        return Image.fromarray(np.ascontiguousarray(array))
    if kind in "ui" or kind == "f":
        values = array.astype(np.float64)
        if values.size and not np.isfinite(values).all():
            raise ImageLoadError(f"The array in {where} holds NaN or infinite values.")
        low, high = float(values.min()), float(values.max())
        if kind == "f" and low >= 0 and high <= 1:
            scale = 255.0
        elif low >= 0 and high <= 255:
            scale = 1.0
        elif array.dtype == np.uint16 or (kind in "ui" and low >= 0 and high <= 65535):
            scale = 255.0 / 65535.0
        else:
            raise ImageLoadError(
                f"The {array.dtype} array in {where} holds values {low:g}..{high:g}: neither [0, 1] (float), 0..255 "
                "nor 0..65535, so pat_hf cannot tell how to show it as an 8-bit image. Scale it to 0..255 first."
            )
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    raise ImageLoadError(f"The array in {where} has dtype {array.dtype}, which is not an image's.")


def _open(source: Any, where: str) -> Any:
    from PIL import Image

    try:
        image = Image.open(source)
        image.load()
    except FileNotFoundError as err:
        raise ImageLoadError(f"The image file {str(source)!r} of {where} does not exist.") from err
    except Exception as err:  # PIL's errors vary by format (UnidentifiedImageError, OSError, SyntaxError, bombs)
        name = f"file {str(source)!r}" if not isinstance(source, io.BytesIO) else "bytes"
        raise ImageLoadError(
            f"Cannot read the image {name} in {where} ({type(err).__name__}: {err}). It is truncated or not an "
            "image: replace it, or remove it from the dataset."
        ) from err
    return image


def as_pil_image(value: Any, column: str, row: int | None = None) -> Any:
    """The PIL image of one value of an image column (see the module's docstring for what is accepted).

    Args:
        value: The column's value for one row.
        column: The column's name (for messages).
        row: The row (for messages), when known.

    Raises:
        DatasetError: None (no image). ImageLoadError: a file that is missing or not an image, an array that
            is not an image, a value of another type; each names the column and the row.
    """
    from PIL import Image

    where = f"column {column!r}" + (f", row {row}" if row is not None else "")
    if isinstance(value, Image.Image):
        return value
    if value is None:
        raise DatasetError(
            f"The image in {where} is missing (None). Remove such rows: "
            f"dataset = dataset.filter(lambda e: e[{column!r}] is not None)."
        )
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return _open(io.BytesIO(value["bytes"]), where)
        if value.get("path"):
            return _open(value["path"], where)
        raise DatasetError(f"The image in {where} is missing (a dict whose 'bytes' and 'path' are both empty).")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(value)), where)
    if isinstance(value, (str, os.PathLike)):
        return _open(os.fspath(value), where)
    channels_first = hasattr(value, "detach") and hasattr(value, "cpu")  # a torch tensor
    if channels_first:
        value = value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        value = np.asarray(value)
    if isinstance(value, np.ndarray):
        return _array_to_pil(value, where, channels_first)
    raise ImageLoadError(
        f"The value in {where} is a {type(value).__name__}, not an image: pat_hf reads PIL images, numpy arrays / "
        "tensors, file paths, encoded bytes and datasets' {'bytes', 'path'} dicts."
    )


def check_prepared(dataset: Any, what: str, info: Any) -> None:
    """With the default collator, the data must yield ``pixel_values``: a `datasets` dataset of raw images that was
    not prepared (no :func:`pat_hf.data.with_image_transforms`, no transform of its own) is refused before training
    instead of failing at the first batch with ``KeyError: 'pixel_values'``.

    Args:
        dataset: The training or evaluation dataset.
        what: "training" or "evaluation", for the message.
        info: What with_image_transforms recorded on it (:func:`pat_hf.data.prepared_info`), or None.

    Raises:
        DatasetError: Naming the columns and the fix.
    """
    if dataset is None or info is not None:
        return
    columns = getattr(dataset, "column_names", None)
    fmt = getattr(dataset, "format", None)
    if not isinstance(columns, list) or "pixel_values" in columns:
        return
    if isinstance(fmt, dict) and fmt.get("type") == "custom":  # a transform of the user's own
        return
    raise DatasetError(
        f"The {what} dataset has no 'pixel_values' (its columns are {columns}) and no transform that makes them: "
        "prepare it with pat_hf.with_image_transforms(dataset, student_view, teacher_view, train=...), or pass a "
        "data_collator that builds the batch from these columns."
    )
