"""Per-model image views: input size, normalisation and the transforms that produce them.

Teacher and student often expect different resolutions and normalisations. pat_hf gives each the SAME
augmented image, then resizes and normalises it for each model separately (:func:`build_image_transforms`; the
training augmentation is timm's, see :mod:`pat_hf.augment`).
When a batch carries only the student's view, :func:`convert_view` derives the teacher's on the device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ImageView", "build_image_transforms", "convert_view"]

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

    def stats(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, device=pixel_values.device, dtype=pixel_values.dtype).view(1, -1, 1, 1)

    x = pixel_values * stats(source.std) + stats(source.mean)
    if tuple(x.shape[-2:]) != tuple(target.size):
        x = F.interpolate(
            x, size=target.size, mode="bilinear", align_corners=False, antialias=x.shape[-1] > target.size[1]
        )
    return (x - stats(target.mean)) / stats(target.std)


def build_image_transforms(
    student_view: ImageView,
    teacher_view: ImageView | None = None,
    *,
    train: bool,
    min_crop_scale: float = 0.08,
    hflip: float | bool = 0.5,
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    train_interpolation: str = "bilinear",
    auto_augment: str | None = None,
    color_jitter: float | Sequence[float] | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> Callable[[Any], dict[str, torch.Tensor]]:
    """Builds the per-image transform that feeds both models from one augmented image.

    Training: timm's ``create_transform`` augmentation (random-resized crop, flip, RandAugment, colour jitter,
    random erasing), every random draw made once at the larger of the two input sizes, then each model's own
    resize and normalisation (see :mod:`pat_hf.augment`, which says exactly what each model sees). Evaluation:
    timm's evaluation transform (shorter side to ``size / crop_pct``, centre crop) for the student, and with a
    teacher view for the teacher too (its own resize and crop of the image, for ``eval_loss_kd``).

    Grey-scale, palette and RGBA images are converted to RGB.

    Args:
        student_view: The student's view.
        teacher_view: The teacher's view; None for methods without a teacher (or, in evaluation, without
            ``eval_teacher_losses``).
        train: Whether to build the training (augmenting) transform.
        min_crop_scale: Lower bound of the random-resized-crop area fraction.
        hflip: Probability of a horizontal flip during training (True = 0.5, False = 0).
        crop_ratio: Aspect-ratio range of the random-resized crop.
        train_interpolation: Interpolation of the random-resized crop: "bilinear", "bicubic", "nearest" or
            "random" (timm picks one per image).
        auto_augment: timm augmentation policy, e.g. ``"rand-m9-mstd0.5-inc1"`` (RandAugment); None for none.
        color_jitter: Colour-jitter factor(s); None or 0 for none (timm skips it when ``auto_augment`` is set).
        re_prob: Probability of timm's random erasing.
        re_mode: Random-erasing fill: "const", "rand" or "pixel".
        re_count: Maximum number of erased boxes per image.

    Returns:
        A function mapping one PIL image to ``{"pixel_values": ..., "teacher_pixel_values": ...}``.
    """
    if train:
        from .augment import build_train_augmentation

        return build_train_augmentation(
            student_view,
            teacher_view,
            min_crop_scale=min_crop_scale,
            crop_ratio=crop_ratio,
            hflip=hflip,
            train_interpolation=train_interpolation,
            auto_augment=auto_augment,
            color_jitter=color_jitter,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
        )
    from timm.data import create_transform

    def evaluation(view: ImageView) -> Callable:
        # timm's evaluation transform (as the official code's validation and the model card's snippet): the
        # shorter side resized to size / crop_pct (aspect ratio kept), then the centre crop, the view's statistics.
        return create_transform(
            input_size=(3, *view.size),
            is_training=False,
            interpolation=view.interpolation,
            mean=tuple(view.mean),
            std=tuple(view.std),
            crop_pct=view.crop_pct,
        )

    student_eval = evaluation(student_view)
    # With a teacher view, evaluation batches carry the teacher's own view of each image (for eval_loss_kd):
    # its resize and centre crop from the original image, not a resize of the student's crop.
    teacher_eval = evaluation(teacher_view) if teacher_view is not None else None

    def transform(image: Any) -> dict[str, torch.Tensor]:
        image = image.convert("RGB")
        out = {"pixel_values": student_eval(image)}
        if teacher_eval is not None:
            out["teacher_pixel_values"] = teacher_eval(image)
        return out

    return transform
