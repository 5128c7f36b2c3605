"""Export of the distilled student: timm's Hub layout (or ``save_pretrained`` for a transformers student).

The export is a plain timm model (``config.json`` + ``model.safetensors``, plus ``README.md`` from
:mod:`pat_hf.models.model_card`) that loads without pat_hf through ``timm.create_model("hf-hub:..." or
"local-dir:...", pretrained=True)``, ``AutoModelForImageClassification.from_pretrained`` (TimmWrapper) and
``pipeline("image-classification")``. Heads, prompts, feedback buffers and the teacher never enter it.
:func:`load_student_weights` reads such an export (or a checkpoint's student) back into a model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model_card import ModelCardInfo, render_model_card
from .student import is_timm_model, is_transformers_model

__all__ = ["CONFIG_NAME", "SAFE_WEIGHTS_NAME", "export_student", "hub_files", "load_student_weights"]

SAFE_WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# What a Hub repo's root holds: the export and nothing else (no training_args.bin, logs, results or checkpoints).
TIMM_HUB_FILES = (CONFIG_NAME, SAFE_WEIGHTS_NAME, "README.md")
TRANSFORMERS_HUB_FILES = (
    CONFIG_NAME,
    SAFE_WEIGHTS_NAME,
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "preprocessor_config.json",
    "README.md",
)


def hub_files(student: nn.Module) -> list[str]:
    """The files of an export (``upload_folder`` ``allow_patterns``): the student in its library's layout.

    Args:
        student: The exported student (unwrapped).

    Returns:
        File names and shard patterns, relative to the export folder.
    """
    return list(TIMM_HUB_FILES if is_timm_model(student) else TRANSFORMERS_HUB_FILES)


def export_student(
    student: nn.Module,
    output_dir: str | os.PathLike,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    class_names: list[str] | None = None,
    model_args: dict[str, Any] | None = None,
    model_class: str | None = None,
    card: ModelCardInfo | None = None,
    image_processor: Any = None,
) -> None:
    """Writes the student alone in its library's Hub layout.

    timm students: ``config.json`` (architecture, num_classes, num_features, label_names, model_args,
    pretrained_cfg with input_size / mean / std / interpolation / crop_pct), ``model.safetensors``. transformers
    students: ``save_pretrained`` plus their image processor. Both get ``README.md`` when ``card`` is given.

    Args:
        student: The trained student (unwrapped).
        output_dir: Destination folder (created).
        state_dict: The student's weights when they come from elsewhere (gathered under FSDP/DeepSpeed);
            default ``student.state_dict()``.
        class_names: Class names in output order (``label_names`` / ``id2label``).
        model_args: Extra ``timm.create_model`` arguments to record (older timm does not record them itself).
        model_class: Dotted path of the class a timm student loads with when timm's registry cannot rebuild it
            (recorded as ``model_class`` in config.json; the model card shows how to load it).
        card: Model-card content; no README.md when None.
        image_processor: The image processor of a transformers student.
    """
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    if state_dict is None:
        state_dict = student.state_dict()
    # safetensors refuses shared or non-contiguous storage; a fresh contiguous copy of each tensor is cheap.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    if is_timm_model(student):
        from timm.models._hub import save_config_for_hf

        model_config: dict[str, Any] = {}
        if class_names:
            model_config["label_names"] = list(class_names)
        config_path = os.path.join(output_dir, CONFIG_NAME)
        # timm <= 1.0.29 calls config_path.open(): a Path works with every release.
        save_config_for_hf(student, Path(config_path), model_config=model_config, model_args=model_args)
        # transformers' TimmWrapper passes num_classes itself (from num_labels) and would get it twice; timm
        # reads it from the root of config.json anyway.
        config = read_json(config_path)
        changed = (
            isinstance(config.get("model_args"), dict) and config["model_args"].pop("num_classes", None) is not None
        )
        if changed and not config["model_args"]:
            del config["model_args"]
        if model_class is not None:
            config["model_class"] = model_class
            changed = True
        if changed:
            with open(config_path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    elif is_transformers_model(student):
        if class_names:
            student.config.id2label = dict(enumerate(class_names))
            student.config.label2id = {n: i for i, n in enumerate(class_names)}
        student.save_pretrained(output_dir, state_dict=tensors)
        if image_processor is not None and hasattr(image_processor, "save_pretrained"):
            image_processor.save_pretrained(output_dir)
    else:
        raise TypeError(
            f"Cannot export a {type(student).__name__}: the student must be a timm model or a transformers model."
        )
    if card is not None:
        with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(render_model_card(card))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_student_weights(student: nn.Module, directory: str) -> None:
    """Loads an exported student's weights (timm layout or ``save_pretrained``) into ``student``."""
    from safetensors.torch import load_file

    path = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} holds no {SAFE_WEIGHTS_NAME}; it is not a pat_hf export or checkpoint.")
    state = load_file(path)
    if is_transformers_model(student):
        result = student.load_state_dict(state, strict=False)
        tied = set(getattr(student, "_tied_weights_keys", None) or [])
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"Weights in {directory!r} do not fit the student: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}."
            )
    else:
        student.load_state_dict(state, strict=True)
