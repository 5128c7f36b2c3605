"""Fashion-MNIST from Debian's `dataset-fashion-mnist` IDX files, and class-balanced subsets (the demo's and the
study's data)."""

from __future__ import annotations

import gzip
import os
import struct
from typing import Any

import numpy as np

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


FASHION_MNIST_MEAN = (0.2860, 0.2860, 0.2860)


FASHION_MNIST_STD = (0.3530, 0.3530, 0.3530)


def read_idx(path: str) -> np.ndarray:
    """The array of an unsigned-byte IDX file (MNIST's format), gzipped (``.gz``) or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    (magic,) = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # unsigned byte data
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x}).")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_idx(root: str, stem: str) -> str | None:
    """The path of ``<root>/<stem>.gz`` or ``<root>/<stem>``, whichever exists first; None when neither does."""
    for name in (f"{stem}.gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def balanced_subset(dataset: Any, size: int, seed: int = 0, label_column: str = "label") -> Any:
    """A fixed, class-balanced random subset of ``size`` examples (``size // num_classes`` per class)."""
    labels = np.asarray(dataset[label_column])
    classes = np.unique(labels)
    per_class = size // len(classes)
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, fewer than {per_class} requested")
        picked.append(rng.choice(idx, per_class, replace=False))
    order = np.sort(np.concatenate(picked))
    return dataset.select(order.tolist())


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
    images_path = find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = find_idx(root, f"{prefix}-labels-idx1-ubyte")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)})
    if images_path and labels_path:
        images = read_idx(images_path)
        labels = read_idx(labels_path).astype(np.int64)
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
