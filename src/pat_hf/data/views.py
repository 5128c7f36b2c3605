"""Per-model image views: input size, normalisation, and the ops that make a model's view on the device.

Teacher and student often expect different resolutions and normalisations. The data loader hands over ONE uint8
image per sample (:mod:`pat_hf.data.augment` makes it on the CPU); each model's view is made from it on the device, in
one batched op per model (:func:`make_view`: resize where the sizes differ, antialiased when shrinking, then the
model's normalisation). :func:`convert_view` re-expresses an already normalised float batch in another view (for
datasets that hand over float ``pixel_values`` they built themselves).

This module depends on no other pat_hf module: :mod:`pat_hf.data.augment` and :mod:`pat_hf.data` build on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageView", "build_eval_transform", "convert_view", "make_view", "pil_to_uint8", "resize_batch"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resize filters by name (torchvision's InterpolationMode values) and PIL's resample codes.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ImageView:
    """How one model wants its images.

    Args:
        size: (height, width) of the model input.
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation.
        interpolation: Resize interpolation: "bilinear", "bicubic", "nearest", "box", "hamming" or "lanczos".
        crop_pct: Fraction of the resized image kept by the evaluation centre crop, in (0, 2] (timm's values
            are 0.875 to 1.15).

    Raises:
        ValueError: A size that is not two positive integers, mean/std that are not 1 or 3 finite numbers (std
            > 0), an unknown interpolation, or a crop_pct outside (0, 2]. One-value mean/std are repeated for
            the 3 channels (images are converted to RGB).
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        raw = (self.size, self.size) if isinstance(self.size, (int, float)) else self.size
        try:
            values = [float(v) for v in raw]
            ok = len(values) == 2 and all(0 < v < math.inf and v == int(v) for v in values)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"ImageView size must be (height, width), two positive integers; got {self.size!r}.")
        stats = {}
        for name in ("mean", "std"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, (int, float)) else value
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                value = ()
            if len(value) == 1:
                value = value * 3
            if len(value) != 3 or not all(math.isfinite(v) for v in value) or (name == "std" and min(value) <= 0):
                rule = "positive" if name == "std" else "finite"
                raise ValueError(f"ImageView {name} must be 1 or 3 {rule} numbers (one per channel); got {value!r}.")
            stats[name] = value
        interpolation = str(self.interpolation).lower()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Unknown ImageView interpolation {self.interpolation!r}; use one of {', '.join(INTERPOLATIONS)}."
            )
        try:
            crop_ok = 0 < float(self.crop_pct) <= 2
        except (TypeError, ValueError):
            crop_ok = False
        if not crop_ok:
            raise ValueError(
                f"ImageView crop_pct must be a fraction in (0, 2] (the evaluation resize is size / crop_pct; "
                f"timm uses 0.875 to 1.15); got {self.crop_pct!r}."
            )
        size = (int(values[0]), int(values[1]))
        for name, value in (("size", size), *stats.items(), ("interpolation", interpolation)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    def agrees_with(self, other: ImageView, tol: float = 1e-4) -> bool:
        """Same input size and normalisation (what the pixels a model receives depend on)."""
        return (
            self.size == other.size
            and all(abs(a - b) <= tol for a, b in zip(self.mean + self.std, other.mean + other.std))
            and len(self.mean) == len(other.mean)
        )

    def describe(self) -> str:
        """``64x64, mean (0.5, 0.5, 0.5), std (...), bicubic, crop 0.875`` (for messages)."""
        mean = ", ".join(f"{m:.4g}" for m in self.mean)
        std = ", ".join(f"{s:.4g}" for s in self.std)
        return (
            f"{self.size[0]}x{self.size[1]}, mean ({mean}), std ({std}), {self.interpolation}, "
            f"crop_pct {self.crop_pct:g}"
        )

    @classmethod
    def from_timm(cls, model: torch.nn.Module) -> ImageView:
        """Reads the view of a timm model from its ``pretrained_cfg`` and its actual input size."""
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        size = tuple(cfg["input_size"][-2:])
        # A ViT built with img_size=32 keeps the source checkpoint's 224 in pretrained_cfg; its patch
        # embedding (timm's MLP-Mixer: its stem) knows the size it really accepts.
        patch_embed = getattr(model, "patch_embed", None) or getattr(model, "stem", None)
        img_size = getattr(patch_embed, "img_size", None)
        if img_size is not None and getattr(patch_embed, "strict_img_size", True):
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        return cls(
            size=(int(size[0]), int(size[1])),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bicubic")),
            crop_pct=float(cfg.get("crop_pct", 1.0)),
        )

    @classmethod
    def from_image_processor(cls, processor: Any, config: Any = None) -> ImageView:
        """Reads the view of a transformers model from its image processor (and config as fallback)."""
        data_config = getattr(processor, "data_config", None)
        if isinstance(data_config, dict) and "input_size" in data_config:  # TimmWrapperImageProcessor
            return cls(
                size=tuple(int(s) for s in data_config["input_size"][-2:]),
                mean=tuple(data_config["mean"]),
                std=tuple(data_config["std"]),
                interpolation=str(data_config.get("interpolation", "bicubic")),
                crop_pct=float(data_config.get("crop_pct", 1.0)),
            )
        mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
        std = getattr(processor, "image_std", None) or IMAGENET_STD
        if not getattr(processor, "do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if isinstance(mean, (int, float)):
            mean = (float(mean),) * 3
        if isinstance(std, (int, float)):
            std = (float(std),) * 3
        size = None
        crop = getattr(processor, "crop_size", None)
        if getattr(processor, "do_center_crop", False) and crop:
            size = _size_from_dict(crop)
        if size is None:
            size = _size_from_dict(getattr(processor, "size", None))
        if size is None and config is not None:
            size = _size_from_config(config)
        resample = getattr(processor, "resample", None)
        interpolation = PIL_RESAMPLE.get(int(resample), "bilinear") if resample is not None else "bilinear"
        return cls(size=size or (224, 224), mean=tuple(mean), std=tuple(std), interpolation=interpolation)

    @classmethod
    def from_config(cls, config: Any) -> ImageView:
        """Fallback view of a transformers model that has no image processor: config size, ImageNet stats."""
        pretrained_cfg = getattr(config, "pretrained_cfg", None)
        if isinstance(pretrained_cfg, dict) and "input_size" in pretrained_cfg:  # TimmWrapperConfig
            return cls(
                size=tuple(int(s) for s in pretrained_cfg["input_size"][-2:]),
                mean=tuple(pretrained_cfg.get("mean", IMAGENET_MEAN)),
                std=tuple(pretrained_cfg.get("std", IMAGENET_STD)),
                interpolation=str(pretrained_cfg.get("interpolation", "bicubic")),
                crop_pct=float(pretrained_cfg.get("crop_pct", 1.0)),
            )
        return cls(size=_size_from_config(config) or (224, 224))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (for manifests and model cards)."""
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }


def _size_from_dict(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, dict) or hasattr(size, "get"):
        if size.get("height") and size.get("width"):
            return (int(size["height"]), int(size["width"]))
        if size.get("shortest_edge"):
            return (int(size["shortest_edge"]),) * 2
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    return None


def _size_from_config(config: Any) -> tuple[int, int] | None:
    image_size = getattr(config, "image_size", None)
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1]))


def resize_batch(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of a float (B, C, H, W) batch to ``size``, antialiased when shrinking; unchanged at ``size``.

    The one resize every view goes through (training and evaluation, device and reference paths), so the views a
    model sees never depend on which path made them.
    """
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    shrinking = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)


def make_view(images: torch.Tensor, view: ImageView, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A model's input from a uint8 batch: resized to the view's size, scaled to [0, 1], normalised.

    One batched op per model, meant to run on the device (where the batch lands after the data loader). The
    result equals timm's ``ToTensor`` + ``Normalize`` followed by :func:`resize_batch` up to float rounding.

    Args:
        images: (B, 3, H, W) uint8 pixels (any device).
        view: The model's view (size, mean, std).
        dtype: Floating dtype of the result (float32: the models cast under autocast themselves).

    Returns:
        (B, 3, *view.size) normalised for ``view``.
    """
    x = resize_batch(images.to(dtype), view.size)
    # (x / 255 - mean) / std as one multiply-add per element.
    scale = 1.0 / (255.0 * _stats(view.std, x))
    return torch.addcmul(-_stats(view.mean, x) / _stats(view.std, x), x, scale)


def convert_view(pixel_values: torch.Tensor, source: ImageView, target: ImageView) -> torch.Tensor:
    """Re-expresses a normalised batch made for ``source`` in ``target``'s size and normalisation.

    The renormalisation is exact. The resize (bilinear, antialiased when shrinking) keeps the geometry only when
    both views show the same field of view, i.e. each would be a plain resize of the same crop of the image; a
    source view made by padding (a 28 px image padded to 32) or cropping differently from the target's is not
    undone, so the target model then sees a shrunk or shifted image. Hand each model its own view instead
    (:func:`pat_hf.with_image_transforms` with a teacher view).

    Args:
        pixel_values: (B, 3, H, W) batch normalised for ``source``.
        source: The view the batch was made for.
        target: The view wanted.

    Returns:
        The batch resized (bilinear, on device) and renormalised for ``target``.
    """
    if source.size == target.size and source.mean == target.mean and source.std == target.std:
        return pixel_values
    x = pixel_values * _stats(source.std, pixel_values) + _stats(source.mean, pixel_values)
    x = resize_batch(x, target.size)
    return (x - _stats(target.mean, x)) / _stats(target.std, x)


def pil_to_uint8(image: Any) -> torch.Tensor:
    """A PIL image as a (3, H, W) uint8 tensor (converted to RGB; no scaling, no normalisation)."""
    array = np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1)


def build_eval_transform(view: ImageView) -> Callable[[Any], torch.Tensor]:
    """timm's evaluation transform for ``view`` without its float conversion: one PIL image to uint8 (3, H, W).

    The shorter side resized to ``size / crop_pct`` (aspect ratio kept, the view's interpolation), then the centre
    crop at the view's size, as timm's ``create_transform(is_training=False)`` (the official code's validation and
    the model card's snippet). Scaling and normalisation happen on the device (:func:`make_view`).
    """
    from timm.data import create_transform

    geometry = create_transform(
        input_size=(3, *view.size),
        is_training=False,
        interpolation=view.interpolation,
        mean=tuple(view.mean),
        std=tuple(view.std),
        crop_pct=view.crop_pct,
        use_prefetcher=True,  # timm's own "no tensor conversion, no normalisation" switch
    )
    # Keep timm's geometric steps (resize, crop); our conversion replaces its trailing ToNumpy / PILToTensor.
    steps = [
        t for t in getattr(geometry, "transforms", [geometry]) if not type(t).__name__.endswith(("Numpy", "Tensor"))
    ]

    def transform(image: Any) -> torch.Tensor:
        image = image.convert("RGB")
        for step in steps:
            image = step(image)
        return pil_to_uint8(image)

    transform.timm_steps = steps  # for inspection (tests, debugging)
    return transform
