"""Training augmentation: timm's ``create_transform``, drawn ONCE per image for both models, and its settings.

The teacher sees the student's augmented image (as in the official PAT / OFA-KD code, which feeds the teacher the
student's batch), only resized and normalised for the teacher. Every random operation is therefore drawn once:

1. on the CPU (a data-loader worker), timm's primary transform (random-resized crop with its scale / ratio /
   interpolation, horizontal flip) and secondary transform (RandAugment / AutoAugment / AugMix, colour jitter) run
   on the PIL image at the *base* size, the larger of the two models' input sizes, and the result leaves the loader
   as ONE uint8 (3, H, W) tensor: no float conversion, no normalisation on the CPU. Random erasing, which works on
   the normalised tensor, is only *drawn* there (boxes and fill seed: :func:`draw_erasing`, a few numbers);
2. on the device, the batch is scaled and normalised with the STUDENT's mean / std (timm's convention), the drawn
   boxes are erased (:func:`erase_batch`, the fill made from the drawn seed: as timm's ``PrefetchLoader`` does
   with ``RandomErasing(device=...)``), and each model's view is made from that one tensor
   (:func:`pat_hf.data.views.convert_view`: resize to the model's size, antialiased when shrinking; the model's
   normalisation). The erased box is the same region of the image in both views and its fill the same pixel
   values, expressed in each model's normalisation. Without erasing, each view is one op on the uint8 batch
   (:func:`pat_hf.data.views.make_view`).

With per-sample seeding (:attr:`AugmentationConfig.per_sample_seed`, on by default) every draw of sample ``i`` in
epoch ``e`` of a run with seed ``s`` comes from generators seeded with ``(s, e, i)`` alone, so the pixels do not
depend on the number of data-loader workers, on the process count, or on where a run was resumed.

All settings travel in ONE object, :class:`AugmentationConfig`, from the example script's arguments (or the API)
through :func:`pat_hf.with_image_transforms` and :func:`build_image_transforms` to
:func:`build_train_augmentation`; it is recorded in the run manifest and the model card.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .views import ImageView, build_eval_transform, pil_to_uint8

__all__ = [
    "ERASE_FIELDS",
    "RE_MODES",
    "TRAIN_INTERPOLATIONS",
    "AugmentationConfig",
    "build_image_transforms",
    "build_train_augmentation",
    "check_augmentation_options",
    "draw_erasing",
    "sample_seed",
    "seeded_draws",
]

TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "random")
RE_MODES = ("const", "rand", "pixel")
# The first field of a timm policy string: RandAugment, AugMix, AutoAugment policies, 3-Augment.
AUTO_AUGMENT_POLICIES = ("rand", "augmix", "v0", "v0r", "original", "originalr", "3a")
# One row per erasing box in a sample's ``erase`` tensor (int64, (re_count, 6)); height 0 = no box.
ERASE_FIELDS = ("top", "left", "height", "width", "mode", "seed")
# timm's RandomErasing defaults (area fraction and aspect-ratio range of a box).
_RE_AREA = (0.02, 1 / 3)
_RE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


@dataclass(frozen=True)
class AugmentationConfig:
    """Every setting of the training augmentation, in one object passed down whole.

    Built once (from the example script's arguments, or by hand) and handed to
    :func:`pat_hf.with_image_transforms`; it is recorded on the prepared dataset, in checkpoints' manifest and in the
    model card. Values are checked on construction.

    Args:
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
            per box) or "pixel" (per-pixel normal noise), in the student's normalisation.
        re_count: Maximum number of erased boxes per image (timm draws 1 to ``re_count``).
        per_sample_seed: Seed every random draw of a sample from (run seed, epoch, sample index) when the trainer
            loads the data, so the pixels do not depend on the worker count or the resume point. False: the
            process's global generators, as timm's own training script (what pat_hf 0.x did).

    Raises:
        ValueError: An out-of-range value, naming the option and what is allowed.

    Example:
        >>> aug = AugmentationConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, min_crop_scale=0.08)
        >>> train = with_image_transforms(data, student_view, teacher_view, train=True, augmentation=aug)
    """

    min_crop_scale: float = 0.08
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    train_interpolation: str = "bilinear"
    auto_augment: str | None = None
    color_jitter: float | tuple[float, ...] | None = None
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    per_sample_seed: bool = True

    def __post_init__(self) -> None:
        hflip = self.hflip
        if isinstance(hflip, bool):  # the former on/off switch: on is timm's usual 0.5
            hflip = 0.5 if hflip else 0.0
        object.__setattr__(self, "hflip", float(hflip))
        object.__setattr__(self, "crop_ratio", tuple(float(r) for r in self.crop_ratio))
        jitter = self.color_jitter
        if isinstance(jitter, (list, tuple)):
            jitter = tuple(float(v) for v in jitter)
        object.__setattr__(self, "color_jitter", jitter)
        object.__setattr__(self, "auto_augment", self.auto_augment or None)
        check_augmentation_options(**self.options())

    def options(self) -> dict[str, Any]:
        """The augmentation keywords (everything but ``per_sample_seed``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "per_sample_seed"}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (manifest, model card)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["crop_ratio"] = list(self.crop_ratio)
        if isinstance(self.color_jitter, tuple):
            out["color_jitter"] = list(self.color_jitter)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AugmentationConfig:
        """The config of :meth:`to_dict` (unknown keys refused, naming them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"Unknown augmentation option(s) {unknown}; known: {sorted(names)}.")
        return cls(**values)

    def describe(self) -> str:
        """One line for the model card: ``crop scale 0.08-1 ratio 0.75-1.33, hflip 0.5, rand-m9-mstd0.5-inc1, ...``."""
        parts = [
            f"crop scale {self.min_crop_scale:g}-1 ratio {self.crop_ratio[0]:.3g}-{self.crop_ratio[1]:.3g} "
            f"({self.train_interpolation})",
            f"hflip {self.hflip:g}",
        ]
        if self.auto_augment:
            parts.append(self.auto_augment)
        elif self.color_jitter:
            parts.append(f"colour jitter {self.color_jitter}")
        if self.erasing:
            parts.append(f"random erasing {self.re_prob:g} ({self.re_mode}, up to {self.re_count})")
        parts.append("seeded per sample" if self.per_sample_seed else "global generators")
        return ", ".join(parts)

    @property
    def erasing(self) -> bool:
        """Whether random erasing is on."""
        return self.re_prob > 0


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


# ---- per-sample seeding ---------------------------------------------------------------------------------------


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of sample ``index`` in ``epoch`` of a run seeded ``run_seed`` (numpy's SeedSequence hash:
    neighbouring keys give unrelated streams)."""
    words = [int(run_seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


@contextlib.contextmanager
def seeded_draws(seed: int | None, restore: bool | None = None) -> Iterator[None]:
    """Python's, numpy's and torch's (CPU) global generators seeded with ``seed`` inside the block. timm's
    transforms draw from those globals.

    Args:
        seed: The seed; None: nothing is seeded (the global streams are used as they are).
        restore: Give the generators back their previous states after the block, so the process's own random
            streams (the trainer's, when the data is loaded in the training process) stay untouched. None: only
            outside data-loader workers (a worker's generators serve its transforms alone, and saving numpy's
            state costs ~0.1 ms per sample).
    """
    if seed is None:
        yield
        return
    if restore is None:
        restore = torch.utils.data.get_worker_info() is None
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state()) if restore else None
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if states is not None:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


# ---- random erasing: drawn on the CPU, applied on the device ----------------------------------------------------


def draw_erasing(config: AugmentationConfig, size: Sequence[int]) -> torch.Tensor:
    """The random-erasing draws of one image of ``size`` (H, W), from Python's ``random`` (as timm's
    ``RandomErasing``: probability, box count 1..``re_count``, area fraction 0.02..1/3 shared by the boxes,
    log-uniform aspect ratio 0.3..3.3, 10 tries per box) plus a seed for each box's fill.

    Returns:
        (re_count, 6) int64: one row per box (see :data:`ERASE_FIELDS`), height 0 for no box.
    """
    rows = torch.zeros(config.re_count, len(ERASE_FIELDS), dtype=torch.int64)
    if random.random() > config.re_prob:
        return rows
    height, width = int(size[0]), int(size[1])
    count = 1 if config.re_count == 1 else random.randint(1, config.re_count)
    mode = RE_MODES.index(config.re_mode)
    for b in range(count):
        for _ in range(10):
            area = random.uniform(*_RE_AREA) * height * width / count
            aspect = math.exp(random.uniform(*_RE_LOG_ASPECT))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if w < width and h < height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                rows[b] = torch.tensor([top, left, h, w, mode, random.getrandbits(62)])
                break
    return rows


# ---- the per-image transforms -----------------------------------------------------------------------------------


def build_train_augmentation(
    student_view: ImageView,
    teacher_view: ImageView | None = None,
    config: AugmentationConfig | None = None,
    **options: Any,
) -> Callable[..., dict[str, torch.Tensor]]:
    """The per-image training transform: timm's augmentation drawn once, one uint8 image at the base size.

    Args:
        student_view: The student's view.
        teacher_view: The teacher's view; None for no teacher. Only its size matters here (the base size is the
            larger of the two).
        config: The augmentation settings; None: built from ``options``.
        **options: :class:`AugmentationConfig` fields (the former keyword arguments), when ``config`` is None.

    Returns:
        A function ``transform(image, seed=None)`` mapping one PIL image to ``{"pixel_values": uint8 (3, H, W)}``
        at the base size, plus ``"erase"`` ((re_count, 6) int64, :func:`draw_erasing`) when random erasing is on.
        With ``seed`` every draw is made from generators seeded with it (:func:`seeded_draws`).
    """
    from timm.data import create_transform

    if config is None:
        config = AugmentationConfig(**options)
    elif options:
        raise TypeError(f"Give either config= or augmentation keywords, not both ({sorted(options)}).")
    base = (
        max(student_view.size[0], teacher_view.size[0] if teacher_view else 0),
        max(student_view.size[1], teacher_view.size[1] if teacher_view else 0),
    )
    color_jitter = config.color_jitter
    if isinstance(color_jitter, (int, float)) and not color_jitter:
        color_jitter = None  # timm would add a ColorJitter(0, 0, 0) that changes nothing
    timm_options = {
        "input_size": (3, *base),
        "is_training": True,
        "scale": (float(config.min_crop_scale), 1.0),
        "ratio": tuple(config.crop_ratio),
        "hflip": float(config.hflip),
        "color_jitter": color_jitter,
        "auto_augment": config.auto_augment,
        "interpolation": config.train_interpolation,
        "mean": tuple(student_view.mean),
        "std": tuple(student_view.std),
        "separate": True,
    }
    accepted = inspect.signature(create_transform).parameters
    missing = [k for k, v in timm_options.items() if k not in accepted and v not in (None, 0.0, False)]
    if missing:
        raise TypeError(f"This timm's create_transform does not accept {missing}; upgrade timm.")
    # Only timm's primary (crop, flip) and secondary (RandAugment, colour jitter) steps run here; its final step
    # (tensor, normalisation, erasing) is replaced by the uint8 conversion and the device-side erasing.
    primary, secondary, _final = create_transform(**{k: v for k, v in timm_options.items() if k in accepted})

    def transform(image: Any, seed: int | None = None) -> dict[str, torch.Tensor]:
        image = image.convert("RGB")
        with seeded_draws(seed):
            out = {"pixel_values": pil_to_uint8(secondary(primary(image)))}
            if config.erasing:
                out["erase"] = draw_erasing(config, base)
        return out

    transform.timm_transforms = (primary, secondary)  # for inspection (tests, debugging)
    transform.base_size = base
    transform.config = config
    return transform


def build_image_transforms(
    student_view: ImageView,
    teacher_view: ImageView | None = None,
    *,
    train: bool,
    augmentation: AugmentationConfig | None = None,
    **options: Any,
) -> Callable[..., dict[str, torch.Tensor]]:
    """Builds the per-image transform that feeds both models from one image (uint8; views made on the device).

    Training: :func:`build_train_augmentation` (one augmented uint8 image at the larger of the two sizes).
    Evaluation: timm's evaluation geometry (shorter side to ``size / crop_pct``, centre crop) for the student, and
    with a teacher view for the teacher too (its own resize and crop of the image, for ``eval_loss_kd``), each as
    uint8 (:func:`pat_hf.data.views.build_eval_transform`).

    Args:
        student_view: The student's view.
        teacher_view: The teacher's view; None for methods without a teacher (or, in evaluation, without
            ``eval_teacher_losses``).
        train: Whether to build the training (augmenting) transform.
        augmentation: The training augmentation's settings; None: built from ``options`` (defaults without).
        **options: :class:`AugmentationConfig` fields (the former keyword arguments), when ``augmentation`` is None.

    Returns:
        A function ``transform(image, seed=None)`` mapping one PIL image to ``{"pixel_values"}`` (uint8), plus
        ``"erase"`` (training with erasing) or ``"teacher_pixel_values"`` (evaluation with a teacher view).
    """
    if augmentation is None:
        augmentation = AugmentationConfig(**options)
    elif options:
        raise TypeError(f"Give either augmentation= or augmentation keywords, not both ({sorted(options)}).")
    if train:
        return build_train_augmentation(student_view, teacher_view, augmentation)
    student_eval = build_eval_transform(student_view)
    teacher_eval = build_eval_transform(teacher_view) if teacher_view is not None else None

    def transform(image: Any, seed: int | None = None) -> dict[str, torch.Tensor]:
        image = image.convert("RGB")
        out = {"pixel_values": student_eval(image)}
        if teacher_eval is not None:
            out["teacher_pixel_values"] = teacher_eval(image)
        return out

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
