"""The trained model: a timm student (or a transformers classifier, for training teachers with ``none``)."""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..data.views import ImageView
from ..errors import StudentLoadError

__all__ = [
    "create_student",
    "is_timm_model",
    "reconcile_student_view",
    "student_build_args",
    "student_logits",
    "student_num_classes",
    "student_source",
    "student_view",
]

logger = logging.getLogger(__name__)

_HUB_PREFIXES = ("hf-hub:", "local-dir:")


def is_timm_model(model: nn.Module) -> bool:
    """Whether ``model`` is a timm model (has a ``pretrained_cfg`` and is not a transformers model)."""
    return isinstance(getattr(model, "pretrained_cfg", None), dict) and not isinstance(model, PreTrainedModel)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (imported at the top: a compiled region may ask, and an import
    inside a traced function breaks the graph on older torch)."""
    return isinstance(getattr(model, "_orig_mod", model), PreTrainedModel)


def create_student(
    name: str,
    num_classes: int | None = None,
    *,
    pretrained: bool | None = None,
    img_size: int | None = None,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    model_class: type[nn.Module] | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Creates a timm student by architecture name, ``hf-hub:`` id or ``local-dir:`` path.

    Some timm entrypoints fix architecture arguments (``mixer_s16_224`` fixes ``patch_size``, ``num_blocks`` and
    ``embed_dim``) and refuse them as overrides. Such a student is built from its class with ``model_class=``
    (e.g. ``timm.models.mlp_mixer.MlpMixer``): every architecture argument is then yours to give (unspecified
    ones take the class's defaults, not the entrypoint's), the name only supplies the ``pretrained_cfg``
    (normalisation, crop). Its export records the class, and its model card says how to load it.

    Args:
        name: A timm architecture (``resnet18``), ``hf-hub:org/name`` or ``local-dir:/path``.
        num_classes: Classifier outputs; a pretrained classifier with another count is re-initialised.
        pretrained: Load pretrained weights. Defaults to True for ``hf-hub:``/``local-dir:`` ids and False for
            bare architecture names (timm's convention; ImageNet weights need the Hub).
        img_size: Input size. Passed to models with a fixed size (ViT, Swin, Mixer); for every model also
            recorded as the input size in its ``pretrained_cfg``, so training and the export preprocess alike.
        pretrained_cfg_overlay: Overrides for the student's ``pretrained_cfg`` (mean, std, crop_pct, ...).
        model_class: Build the model from this timm model class (or its dotted path) with ``kwargs`` as its
            constructor arguments, through ``timm.models.build_model_with_cfg``, instead of through the name's
            entrypoint. No pretrained weights.
        **kwargs: Further ``timm.create_model`` arguments (the class's constructor arguments with ``model_class``).

    Returns:
        The timm model.

    Raises:
        ValueError: When the name is neither a timm architecture nor a hub / local-dir id, or when the name's
            entrypoint fixes an argument given in ``kwargs`` (the message names the class to use).
    """
    import timm

    is_hub = name.startswith(_HUB_PREFIXES)
    if name.startswith("local-dir:") and not os.path.isdir(os.path.expanduser(name[len("local-dir:") :])):
        raise ValueError(f"Student {name!r}: no such folder. Give the folder of a timm export (config.json).")
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
    if model_class is not None:
        return _create_from_class(name, model_class, img_size, kwargs, built_with)
    if img_size is None:
        model = _create_by_name(name, pretrained, kwargs)
    else:
        try:
            model = _create_by_name(name, pretrained, {**kwargs, "img_size": img_size})
            built_with["img_size"] = img_size
        except TypeError as err:
            # CNNs take any input size and have no img_size argument: the size only goes to pretrained_cfg.
            if "img_size" not in str(err):
                raise
            model = _create_by_name(name, pretrained, kwargs)
    # Older timm releases do not record construction arguments; the export needs them to rebuild the model.
    model.pat_hf_model_args = built_with
    # Where its weights came from: pat_hf never writes there.
    model.pat_hf_source = name if is_hub else None
    return model


_FIXED_ARGUMENT = re.compile(r"got multiple values for keyword argument '(\w+)'")


def _create_by_name(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model``, turning an entrypoint's refusal of a fixed argument into a message that says how to
    build such a student."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as err:
        if not pretrained:
            raise
        # Offline, no network, or a missing cache entry: huggingface_hub's message names neither the model nor
        # the setting that asked for the download.
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        raise StudentLoadError(
            f"Cannot load the pretrained weights of the student {name!r} (pretrained=True, --student_pretrained): "
            f"they are not in the local Hub cache and "
            + ("HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached")
            + f" ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}). Set "
            "pretrained=False (--student_pretrained false) to start from random weights, download the weights "
            "while online, or give a local copy as 'local-dir:PATH'."
        ) from err
    except TypeError as err:
        match = _FIXED_ARGUMENT.search(str(err))
        if match is None:
            raise
        with torch.device("meta"):
            model_class = type(timm.create_model(name, pretrained=False))
        path = f"{model_class.__module__}.{model_class.__qualname__}"
        raise ValueError(
            f"timm's entrypoint {name!r} fixes {match.group(1)!r} (and may fix other architecture arguments), so it "
            f"cannot be changed through the name. Build the student from its class, giving every architecture "
            f"argument: create_student({name!r}, model_class={path!r}, ...) (or "
            f"timm.models.build_model_with_cfg({model_class.__name__}, {name!r}, ...) with student_model_args= "
            "the arguments you gave). Its export will load with the class, as its model card shows."
        ) from err


def _create_from_class(
    name: str, model_class: type[nn.Module] | str, img_size: Any, kwargs: dict[str, Any], built_with: dict[str, Any]
) -> nn.Module:
    from timm.models import build_model_with_cfg

    cls = resolve_model_class(model_class) if isinstance(model_class, str) else model_class
    if img_size is not None:
        kwargs["img_size"] = img_size
        built_with["img_size"] = img_size
    model = build_model_with_cfg(cls, name, pretrained=False, **kwargs)
    model.pat_hf_model_args = built_with
    model.pat_hf_model_class = f"{cls.__module__}.{cls.__qualname__}"
    return model


def resolve_model_class(path: str) -> type[nn.Module]:
    """The class named by a dotted path such as ``timm.models.mlp_mixer.MlpMixer``.

    Raises:
        ValueError: When the path does not name an ``nn.Module`` subclass.
    """
    import importlib

    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"{path!r} does not name a model class (e.g. 'timm.models.mlp_mixer.MlpMixer'): {err}"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{path!r} is not an nn.Module class.")
    return cls


def student_source(student: nn.Module) -> str | None:
    """The ``hf-hub:`` / ``local-dir:`` id or folder a student's weights were read from, or None."""
    source = getattr(student, "pat_hf_source", None)
    cfg = getattr(student, "pretrained_cfg", None)
    if source is None and isinstance(cfg, dict) and cfg.get("source") == "local-dir" and cfg.get("file"):
        source = "local-dir:" + str(cfg["file"])
    if source is None and is_transformers_model(student):
        source = getattr(student.config, "_name_or_path", None) or None
    return source


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


def student_build_args(student: nn.Module, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``timm.create_model`` arguments that rebuild ``student`` (recorded ones, plus in_chans, global_pool,
    img_size as the model has them), JSON-normalised (tuples as lists); ``{}`` for a transformers model."""
    if not is_timm_model(student):
        return {}
    try:
        from timm.models._input import get_model_args
    except ImportError:  # older timm records no construction arguments
        get_model_args = None
    args = dict(get_model_args(student, model_args or {})) if get_model_args else dict(model_args or {})
    return json.loads(json.dumps(args, default=str))


def _fixed_input_size(student: nn.Module) -> tuple[int, int] | None:
    patch_embed = getattr(student, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or not getattr(patch_embed, "strict_img_size", False):
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _patch_stride(patch_embed: nn.Module) -> tuple[int, int] | None:
    """The stride of a patch embedding, read from its convolution (PVT-v2: kernel 7, stride 4), not its
    ``patch_size`` attribute (the kernel)."""
    convs = [m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != 1:
        return None  # a stem of several convolutions pads: any size works
    return int(convs[0].stride[0]), int(convs[0].stride[1])


def _cuts_into_patches(patch_embed: nn.Module) -> bool:
    """Whether the embedding drops the border of an input that is not a multiple of its stride: a convolution
    whose kernel equals its stride and that does not pad (ViT), unlike an overlapping one (PVT-v2, kernel 7)."""
    convs = [m for m in patch_embed.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != 1:
        return False
    conv = convs[0]
    padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
    return tuple(conv.kernel_size) == tuple(conv.stride) and tuple(padding) == (0, 0)


def reconcile_student_view(
    student: nn.Module,
    processing_class: Any = None,
    train_view: ImageView | None = None,
    eval_view: ImageView | None = None,
) -> ImageView:
    """The student's view, made to agree with the views its data was prepared with.

    A timm student records what it is trained on: when the data's size, mean/std, interpolation or (evaluation)
    crop_pct differ from its ``pretrained_cfg``, the ``pretrained_cfg`` takes the data's values (with a warning
    for size and normalisation), so its export preprocesses as training did. A transformers student with an
    image processor must agree with the data; one without takes the data's view.

    Raises:
        ValueError: Training and evaluation data prepared with different student views; data of another size
            than a fixed-size student (ViT) accepts; a transformers student whose processor disagrees; a timm
            student built for another channel count than the 3 RGB channels of the data.
    """
    own = student_view(student, processing_class)
    data = train_view or eval_view
    if data is None:
        return own
    if train_view is not None and eval_view is not None and not train_view.agrees_with(eval_view):
        raise ValueError(
            f"The training data was prepared for the student with {train_view.describe()} but the evaluation "
            f"data with {eval_view.describe()}: one run must use one view. Build both with the same ImageView."
        )
    if not is_timm_model(student):
        if own.agrees_with(data):
            return own
        if processing_class is not None:
            raise ValueError(
                f"The data was prepared for the student with {data.describe()}, but its image processor "
                f"(processing_class) says {own.describe()}. Build the dataset with "
                "ImageView.from_image_processor(processing_class)."
            )
        return data
    in_chans = student_build_args(student).get("in_chans", 3)
    if in_chans != 3:
        raise ValueError(
            f"The student was built with in_chans={in_chans}, but with_image_transforms feeds RGB images "
            "(3 channels). Create it with in_chans=3 (the default)."
        )
    fixed = _fixed_input_size(student)
    if fixed is not None and fixed != data.size:
        raise ValueError(
            f"The student takes {fixed[0]}x{fixed[1]} inputs only, but the data was prepared at "
            f"{data.size[0]}x{data.size[1]}. Create it with img_size={data.size[0]} (pat_hf.create_student(..., "
            f"img_size=...)) or build the dataset with ImageView.from_timm(student)."
        )
    patch_embed = getattr(student, "patch_embed", None)
    patch = _patch_stride(patch_embed) if isinstance(patch_embed, nn.Module) else None
    if (
        patch
        and not getattr(patch_embed, "dynamic_img_pad", False)
        and _cuts_into_patches(patch_embed)
        and (data.size[0] % patch[0] or data.size[1] % patch[1])
    ):
        raise ValueError(
            f"The student cuts its input into {patch[0]}x{patch[1]} patches, but the data was prepared at "
            f"{data.size[0]}x{data.size[1]}, not a multiple. Prepare it at a multiple of the patch size "
            "(ImageView.from_timm(student) gives the size the student was built for)."
        )
    crop_pct = eval_view.crop_pct if eval_view is not None else own.crop_pct
    if own.agrees_with(data) and own.interpolation == data.interpolation and own.crop_pct == crop_pct:
        return own
    if not own.agrees_with(data):
        logger.warning(
            "The student's pretrained_cfg says %s, but its data is prepared with %s: its pretrained_cfg (and its "
            "export's config.json) now record what it is trained on.",
            own.describe(),
            data.describe(),
        )
    channels = (student.pretrained_cfg.get("input_size") or (3,))[0]
    cfg = dict(student.pretrained_cfg)
    cfg.update(
        input_size=(channels, *data.size),
        mean=data.mean,
        std=data.std,
        interpolation=data.interpolation,
        crop_pct=crop_pct,
    )
    student.pretrained_cfg = cfg
    if hasattr(student, "default_cfg"):
        student.default_cfg = cfg
    return ImageView.from_timm(student)
