"""The trained model: a timm student (or a transformers classifier, for training teachers with ``none``)."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import torch
from torch import nn

from .preprocessing import ImageView

__all__ = ["create_student", "is_timm_model", "student_logits", "student_num_classes", "student_view"]

logger = logging.getLogger(__name__)

_HUB_PREFIXES = ("hf-hub:", "local-dir:")


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm model (has a ``pretrained_cfg`` and is not a transformers model)."""
    from transformers import PreTrainedModel

    return isinstance(getattr(model, "pretrained_cfg", None), dict) and not isinstance(model, PreTrainedModel)


def is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def create_student(
    name: str,
    num_classes: int | None = None,
    *,
    pretrained: bool | None = None,
    img_size: int | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Creates a timm student by architecture name, ``hf-hub:`` id or ``local-dir:`` path.

    Args:
        name: A timm architecture (``resnet18``), ``hf-hub:org/name`` or ``local-dir:/path``.
        num_classes: Classifier outputs; a pretrained classifier with another count is re-initialised.
        pretrained: Load pretrained weights. Defaults to True for ``hf-hub:``/``local-dir:`` ids and False for
            bare architecture names (timm's convention; ImageNet weights need the Hub).
        img_size: Input size. Passed to models with a fixed size (ViT, Swin, Mixer); for every model also
            recorded as the input size in its ``pretrained_cfg``, so training and the export preprocess alike.
        pretrained_cfg_overlay: Overrides for the student's ``pretrained_cfg`` (mean, std, crop_pct, ...).
        **kwargs: Further ``timm.create_model`` arguments.

    Returns:
        The timm model.

    Raises:
        ValueError: When the name is neither a timm architecture nor a hub / local-dir id.
    """
    import timm

    is_hub = name.startswith(_HUB_PREFIXES)
    if not is_hub:
        if "/" in name or ":" in name:
            raise ValueError(
                f"Student {name!r} looks like a Hub id or a path: write it as 'hf-hub:{name}' or "
                f"'local-dir:{name}' (timm's prefixes)."
            )
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"Unknown timm student architecture {name!r}.{hint} `timm.list_models('*pattern*')` lists them."
            )
    if pretrained is None:
        pretrained = is_hub
    overlay = dict(pretrained_cfg_overlay or {})
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        overlay.setdefault("input_size", (3, *size))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if overlay:
        kwargs["pretrained_cfg_overlay"] = overlay
    built_with = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    if img_size is None:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    else:
        try:
            model = timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
            built_with["img_size"] = img_size
        except TypeError as err:
            # CNNs take any input size and have no img_size argument: the size only goes to pretrained_cfg.
            if "img_size" not in str(err):
                raise
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    # Older timm releases do not record construction arguments; the export needs them to rebuild the model.
    model.pat_hf_model_args = built_with
    return model


def student_logits(student: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits of a timm or transformers student."""
    if is_transformers_model(student):
        return student(pixel_values=pixel_values).logits
    out = student(pixel_values)
    if isinstance(out, (tuple, list)):  # distilled DeiT in train mode returns (cls, dist) logits
        out = (out[0] + out[1]) / 2
    return out


def student_num_classes(student: nn.Module) -> int | None:
    if is_transformers_model(student):
        return int(student.config.num_labels)
    n = getattr(student, "num_classes", None)
    return int(n) if n is not None else None


def student_view(student: nn.Module, processing_class: Any = None) -> ImageView:
    """The student's input view: timm's ``pretrained_cfg``, or a transformers model's image processor."""
    if is_timm_model(student):
        return ImageView.from_timm(student)
    if processing_class is not None and (
        hasattr(processing_class, "image_mean") or hasattr(processing_class, "data_config")
    ):
        return ImageView.from_image_processor(processing_class, getattr(student, "config", None))
    config = getattr(student, "config", None)
    if config is not None:
        return ImageView.from_config(config)
    raise ValueError(
        f"Cannot tell the input size and normalisation of the student {type(student).__name__}: use a timm model "
        "(its pretrained_cfg says) or a transformers model with its image processor as processing_class."
    )


def check_timm_rebuildable(student: nn.Module, model_args: dict[str, Any] | None = None) -> None:
    """Checks that the export of a timm student will rebuild the same architecture.

    ``timm.create_model(architecture, **model_args)`` is built on the meta device (no memory, no time) and its
    parameter shapes compared with the student's, so a mismatch fails before training instead of at load time.
    """
    import timm

    try:
        from timm.models._input import get_model_args
    except ImportError:  # older timm records no construction arguments
        get_model_args = None
    args = dict(get_model_args(student, model_args or {})) if get_model_args else dict(model_args or {})
    args.setdefault("num_classes", student.num_classes)
    arch = student.pretrained_cfg.get("architecture")
    if not arch:
        raise ValueError("The timm student has no pretrained_cfg['architecture']; create it with timm.create_model.")
    try:
        with torch.device("meta"):
            reference = timm.create_model(arch, pretrained=False, **args)
    except Exception as err:  # a model that cannot be built on the meta device is checked at export instead
        logger.warning("Could not check that the export of %r rebuilds the same model (%s).", arch, err)
        return
    ours = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(
            f"The student {arch!r} differs from timm.create_model({arch!r}, **{args}) (first differences: {diff}); "
            "its export would not load back. Create it with pat_hf.create_student or pass student_model_args= "
            "with the arguments it was built with."
        )
