"""The data layer: what each model sees and how batches are built.

- :mod:`.views`: :class:`ImageView` (a model's input size, normalisation, resize) and the per-image transforms;
- :mod:`.augment`: timm's training augmentation, drawn once per image for both models;
- :mod:`.mixup`: :class:`PairedMixup`, timm's Mixup / CutMix applied alike to the student's and teacher's batch;
- :mod:`.datasets`: ``with_image_transforms`` on a ``datasets`` split, collation, the Fashion-MNIST loader.

Imports only the package's core modules (``errors``, ``version``); every other layer may import it.
``pat_hf.data`` was one module in pat_hf 0.2: the names it exported are exported here.
"""

from .datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    TensorBatchCollator,
    balanced_subset,
    collate_images,
    dataset_class_names,
    find_idx,
    load_fashion_mnist,
    normalise_class_name,
    prepared_info,
    prepared_views,
    read_idx,
    with_image_transforms,
)
from .mixup import PairedMixup
from .views import ImageView

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "ImageView",
    "PairedMixup",
    "TensorBatchCollator",
    "balanced_subset",
    "collate_images",
    "dataset_class_names",
    "find_idx",
    "load_fashion_mnist",
    "normalise_class_name",
    "prepared_info",
    "prepared_views",
    "read_idx",
    "with_image_transforms",
]
