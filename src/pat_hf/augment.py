"""Training augmentation with timm's ``create_transform``, drawn ONCE per image for both models.

The teacher sees the student's augmented image (as in the official PAT / OFA-KD code, which feeds the teacher the
student's batch), only resized and normalised for the teacher. Every random operation is therefore drawn once:

1. timm's primary transform (random-resized crop with its scale / ratio / interpolation, horizontal flip) and
   secondary transform (RandAugment / AutoAugment / AugMix, colour jitter) run on the PIL image at the *base*
   size, the larger of the two models' input sizes;
2. timm's final transform turns it into a tensor normalised with the STUDENT's mean / std and applies random
   erasing there (box, count and fill drawn once);
3. each model's view is derived from that one tensor with :func:`pat_hf.preprocessing.convert_view`: un-normalise,
   resize to the model's size (antialiased bilinear; nothing to do at the base size), normalise with the model's
   statistics. The erased box is thus the same region of the image in both views (scaled with the view), and its
   fill is the same pixel values, expressed in each model's normalisation.

With equal views (same size and statistics) both tensors are identical; with a teacher at twice the student's size,
the student's view is the teacher's, downsampled.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .preprocessing import ImageView, convert_view

__all__ = ["RE_MODES", "TRAIN_INTERPOLATIONS", "build_train_augmentation", "check_augmentation_options"]

TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
RE_MODES = ("const", "rand", "pixel")
# The first field of a timm policy string: RandAugment, AugMix, AutoAugment policies, 3-Augment.
AUTO_AUGMENT_POLICIES = ("rand", "augmix", "v0", "v0r", "original", "originalr", "3a")


def check_augmentation_options(
    *,
    min_crop_scale: float = 0.08,
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float | bool = 0.5,
    train_interpolation: str = "bilinear",
    auto_augment: str | None = None,
    color_jitter: float | Sequence[float] | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> None:
    """Raises ValueError, naming the option and what is allowed, on an out-of-range augmentation option."""
    if not 0 < min_crop_scale <= 1:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}.")
    if len(crop_ratio) != 2 or not 0 < crop_ratio[0] <= crop_ratio[1]:
        raise ValueError(f"crop_ratio must be two aspect ratios 0 < low <= high, got {list(crop_ratio)}.")
    if not 0 <= float(hflip) <= 1:
        raise ValueError(f"hflip is a probability in [0, 1], got {hflip}.")
    if train_interpolation not in TRAIN_INTERPOLATIONS:
        raise ValueError(
            f"train_interpolation must be one of {', '.join(TRAIN_INTERPOLATIONS)}, got {train_interpolation!r}."
        )
    if auto_augment and auto_augment.split("-")[0] not in AUTO_AUGMENT_POLICIES:
        raise ValueError(
            f"auto_augment {auto_augment!r} is not a timm policy string: RandAugment 'rand-m9-mstd0.5-inc1', "
            "AugMix 'augmix-m5-w4-d2', AutoAugment 'v0' / 'original', or '3a'."
        )
    if auto_augment and "-inc1" in auto_augment and not _pillow_posterizes_to_zero_bits():
        import PIL

        raise ValueError(
            f"auto_augment {auto_augment!r}: timm's increasing posterize keeps 0 bits at full magnitude, which Pillow "
            f"{PIL.__version__} refuses ('bits must be between or equal to 1 and 8') mid-training. Install "
            "'pillow<13' (pat_hf's requirement), or drop '-inc1' from the policy."
        )
    if color_jitter is not None:
        values = [color_jitter] if isinstance(color_jitter, (int, float)) else list(color_jitter)
        if len(values) not in (1, 3, 4) or any(v < 0 for v in values):
            raise ValueError(f"color_jitter must be one factor >= 0 or 3-4 factors (b, c, s[, h]), got {color_jitter}.")
    if not 0 <= re_prob <= 1:
        raise ValueError(f"re_prob is a probability in [0, 1], got {re_prob}.")
    if re_mode not in RE_MODES:
        raise ValueError(f"re_mode must be one of {', '.join(RE_MODES)}, got {re_mode!r}.")
    if re_count < 1:
        raise ValueError(f"re_count must be >= 1, got {re_count}.")


def build_train_augmentation(
    student_view: ImageView,
    teacher_view: ImageView | None = None,
    *,
    min_crop_scale: float = 0.08,
    crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float | bool = 0.5,
    train_interpolation: str = "bilinear",
    auto_augment: str | None = None,
    color_jitter: float | Sequence[float] | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
) -> Callable[[Any], dict[str, torch.Tensor]]:
    """The per-image training transform: timm's augmentation drawn once, then one view per model.

    Args:
        student_view: The student's view (its statistics normalise the augmented tensor, as in timm).
        teacher_view: The teacher's view; None for no teacher view.
        min_crop_scale: Lower bound of the random-resized crop's area fraction (upper bound 1).
        crop_ratio: Aspect-ratio range of the random-resized crop.
        hflip: Probability of a horizontal flip (True = 0.5, False = 0).
        train_interpolation: Interpolation of the random-resized crop ("bilinear", "bicubic", "nearest" or
            "random", timm's choice per image); also RandAugment's unless "random".
        auto_augment: timm policy string, e.g. ``"rand-m9-mstd0.5-inc1"`` (RandAugment), or None.
        color_jitter: Colour-jitter factor(s); None or 0 for none. As in timm, colour jitter is skipped when
            ``auto_augment`` is set (timm disables it under RandAugment / AutoAugment).
        re_prob: Probability of timm's random erasing per image.
        re_mode: Random-erasing fill: "const" (zero, i.e. the student's mean colour), "rand" (one normal colour
            per box) or "pixel" (per-pixel normal noise), drawn in the student's normalisation.
        re_count: Maximum number of erased boxes per image.

    Returns:
        A function mapping one PIL image to ``{"pixel_values"}`` (and ``"teacher_pixel_values"`` with a teacher).
    """
    from timm.data import create_transform

    if isinstance(hflip, bool):  # the former on/off switch: on is timm's usual 0.5
        hflip = 0.5 if hflip else 0.0
    check_augmentation_options(
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
    base = (
        max(student_view.size[0], teacher_view.size[0] if teacher_view else 0),
        max(student_view.size[1], teacher_view.size[1] if teacher_view else 0),
    )
    if isinstance(color_jitter, (int, float)) and not color_jitter:
        color_jitter = None  # timm would add a ColorJitter(0, 0, 0) that changes nothing
    options = {
        "input_size": (3, *base),
        "is_training": True,
        "scale": (float(min_crop_scale), 1.0),
        "ratio": tuple(float(r) for r in crop_ratio),
        "hflip": float(hflip),
        "color_jitter": color_jitter,
        "auto_augment": auto_augment or None,
        "interpolation": train_interpolation,
        "mean": tuple(student_view.mean),
        "std": tuple(student_view.std),
        "re_prob": float(re_prob),
        "re_mode": re_mode,
        "re_count": int(re_count),
        "separate": True,
    }
    accepted = inspect.signature(create_transform).parameters
    missing = [k for k, v in options.items() if k not in accepted and v not in (None, 0.0, False)]
    if missing:
        raise TypeError(f"This timm's create_transform does not accept {missing}; upgrade timm.")
    primary, secondary, final = create_transform(**{k: v for k, v in options.items() if k in accepted})
    # The tensor timm's final transform makes: the base size, the student's normalisation.
    base_view = ImageView(size=base, mean=student_view.mean, std=student_view.std)

    def transform(image: Any) -> dict[str, torch.Tensor]:
        x = final(secondary(primary(image.convert("RGB"))))[None]
        out = {"pixel_values": convert_view(x, base_view, student_view)[0]}
        if teacher_view is not None:
            out["teacher_pixel_values"] = convert_view(x, base_view, teacher_view)[0]
        return out

    transform.timm_transforms = (primary, secondary, final)  # for inspection (tests, debugging)
    return transform


@functools.cache
def _pillow_posterizes_to_zero_bits() -> bool:
    """Whether this Pillow accepts ``ImageOps.posterize(image, 0)`` (Pillow 13 raises)."""
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        return False
    return True
