"""The rebuild check: the exported student's config must rebuild the same model through timm (or its class)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .student import resolve_model_class

logger = logging.getLogger(__name__)


def check_timm_rebuildable(
    student: nn.Module, model_args: dict[str, Any] | None = None, model_class: str | None = None
) -> str | None:
    """Checks that the export of a timm student will rebuild the same architecture, and says how it will load.

    The model is rebuilt on the meta device (no memory, no time) and its parameter shapes compared with the
    student's, so a mismatch fails before training instead of at load time: first through timm's registry
    (``timm.create_model(architecture, **model_args)``: what ``timm.create_model("local-dir:...")`` and
    transformers' TimmWrapper will do), else, for a student built from its class, as ``class(**model_args)``.

    Args:
        student: The timm student.
        model_args: The arguments it was built with (what :func:`create_student` recorded, or
            ``student_model_args=``).
        model_class: Dotted path of the class it was built from (``create_student(model_class=...)``).

    Returns:
        None when the export loads through timm's registry, else the dotted path of the class it loads with.

    Raises:
        ValueError: When neither rebuilds the student: the message says what to pass.
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
    ours = {k: tuple(v.shape) for k, v in student.state_dict().items()}

    def shapes(build: Any) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in build().state_dict().items()}

    try:
        by_name = shapes(lambda: timm.create_model(arch, pretrained=False, **args))
    except TypeError as err:
        by_name, name_error = None, err
    except Exception as err:  # a model that cannot be built on the meta device is checked at export instead
        logger.warning("Could not check that the export of %r rebuilds the same model (%s).", arch, err)
        return model_class
    if by_name == ours:
        return None
    cls_path = model_class or f"{type(student).__module__}.{type(student).__qualname__}"
    if model_args or model_class:
        try:
            by_class = shapes(lambda: resolve_model_class(cls_path)(**args))
        except (TypeError, ValueError):
            by_class = None
        if by_class == ours:
            logger.warning(
                "The export of this %s will not load with timm.create_model(%r, ...)%s: it loads as "
                "%s(**config['model_args'], num_classes=config['num_classes']) and model.safetensors, as its model "
                "card shows.",
                type(student).__name__,
                arch,
                f" ({name_error})" if by_name is None else "",
                cls_path,
            )
            return cls_path
    if by_name is None:
        detail = f"timm.create_model({arch!r}, **{args}) fails ({name_error})"
    else:
        diff = sorted(set(ours.items()) ^ set(by_name.items()))[:3]
        detail = f"the student differs from timm.create_model({arch!r}, **{args}) (first differences: {diff})"
    raise ValueError(
        f"This {type(student).__name__} student's export would not load back: {detail}. Create it with "
        "pat_hf.create_student (with model_class= for a student built from its class), or pass student_model_args= "
        "with every argument it was built with."
    )
