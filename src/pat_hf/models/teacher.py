"""The frozen teacher: loading, validation, class mapping and its forward pass.

The teacher is a `transformers` image classifier (ViT, DeiT, BEiT, Swin, ConvNeXt, ResNet, any timm model
through TimmWrapper, ...). It is never trained: frozen, always in eval mode, not a submodule of the trainable
wrapper (so it stays out of the optimizer, DDP and checkpoints).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoint_integrity import file_problem
from ..data.datasets import normalise_class_name
from ..data.views import ImageView
from ..errors import TeacherLoadError
from .classes import ambiguous_names, match_classes, model_label_names

__all__ = [
    "Teacher",
    "ambiguous_names",
    "load_teacher",
    "match_classes",
    "model_label_names",
    "normalise_class_name",
]

logger = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A frozen image classifier with what pat_hf needs to know about it.

    Args:
        model: The transformers model.
        view: Input size and normalisation the model expects.
        name_or_path: Hub id or local path it came from (None for an in-memory model).
        revision: Hub revision it came from.
        class_index: When set, ``logits[:, class_index]`` puts the teacher's classes in dataset order.
        view_source: Where ``view`` came from: ``image_processor``, ``pretrained_cfg`` (TimmWrapper), ``data``
            (the view the training data was prepared with) or ``config`` (a guess: config size, ImageNet mean/std).
        source_dir: The local folder the weights were read from (a path, or the Hub cache's snapshot), which
            pat_hf never writes to.
    """

    model: nn.Module
    view: ImageView
    name_or_path: str | None = None
    revision: str | None = None
    class_index: torch.Tensor | None = None
    view_source: str = "given"
    source_dir: str | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.model.requires_grad_(False)
        self.model.eval()

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    @property
    def label_names(self) -> list[str] | None:
        return model_label_names(self.model)

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        if self.class_index is not None:
            self.class_index = self.class_index.to(device)
        return self

    def ensure_eval(self) -> None:
        """Re-asserts eval mode (cheap); a callback or user code calling ``.train()`` must not leak in."""
        if self.model.training:
            self.model.eval()

    def map_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Puts teacher logits in the dataset's class order."""
        if self.class_index is None:
            return logits
        return logits.index_select(-1, self.class_index)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Teacher logits in dataset class order, under the caller's grad mode."""
        self.ensure_eval()
        # Under DeepSpeed the teacher may hold bf16 weights while the batch is float32.
        dtype = next(self.model.parameters()).dtype
        outputs = self.model(pixel_values=pixel_values.to(dtype))
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        return self.map_logits(logits)

    def fingerprint(self) -> str:
        """A short hash of the teacher's weights, recorded in checkpoint manifests."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def use_data_view(self, view: ImageView) -> None:
        """Takes the teacher view the training data was prepared with, or refuses one that disagrees.

        A teacher whose view is only a guess (no image processor) takes the data's; one with an image processor
        or a timm ``pretrained_cfg`` must agree with it (same size, mean and std).

        Raises:
            ValueError: The two views disagree, naming both.
        """
        if self.view.agrees_with(view):
            return
        if self.view_source == "config":
            self.view, self.view_source = view, "data"
            return
        raise ValueError(
            f"The training data was prepared for the teacher with {view.describe()}, but the teacher's "
            f"{self.view_source} says {self.view.describe()}. Build the dataset with the teacher's view "
            "(pat_hf.load_teacher(...).view, or ImageView.from_image_processor of its processor), or pass the "
            "processor the data was made for as teacher_image_processor=."
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name_or_path": self.name_or_path,
            "revision": self.revision,
            "architecture": type(self.model).__name__,
            "fingerprint": self.fingerprint(),
        }


def is_image_classifier(model: Any) -> bool:
    """Whether ``model`` is a transformers image classifier (takes pixel_values, returns logits)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    params = inspect.signature(model.forward).parameters
    if "pixel_values" not in params:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

        known = set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.values())
    except ImportError:  # pragma: no cover - very old transformers
        known = set()
    name = type(model).__name__
    return name in known or name.endswith("ForImageClassification") or "ForImageClassification" in name


_normalise = normalise_class_name


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")


def _fail(teacher: str, problem: str, fix: str = "") -> TeacherLoadError:
    return TeacherLoadError(f"Cannot load the teacher {teacher!r}: {problem}" + (f" {fix}" if fix else ""))


def _check_teacher_folder(path: str) -> None:
    """Reads a local teacher folder's files cheaply (no tensors) and says what is wrong, naming the file."""
    if not os.path.isdir(path):
        raise _fail(path, "it is a file, not a model folder.", "Give the folder that holds config.json.")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise _fail(
            path,
            f"the folder has no config.json (it holds {sorted(os.listdir(path))[:8]}).",
            "Give the folder written by save_pretrained (config.json + model.safetensors).",
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as err:
        raise _fail(
            path, f"{config_path} is not valid JSON ({err}).", "Restore the file or save the model again."
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise _fail(path, f"{config_path} has no 'model_type': it is not a transformers model config.")
    architectures = config.get("architectures") or []
    if architectures and not any("ImageClassification" in a for a in architectures):
        raise _fail(
            path,
            f"it is a {', '.join(architectures)} ({config['model_type']}), not an image classifier.",
            "The teacher must be a transformers image classifier (e.g. ViTForImageClassification).",
        )
    weights = [name for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not weights:
        raise _fail(path, f"the folder has no weights ({' or '.join(WEIGHT_FILES[::2])}).")
    problem = file_problem(os.path.join(path, weights[0]))
    if problem:
        raise _fail(path, f"{os.path.join(path, weights[0])} is {problem}.", "Download or save the model again.")
    for name in ("preprocessor_config.json",):
        problem = file_problem(os.path.join(path, name)) if os.path.isfile(os.path.join(path, name)) else None
        if problem:
            raise _fail(
                path,
                f"{os.path.join(path, name)} is {problem}.",
                "Restore it or delete it (the config's size is then used).",
            )


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
    """The Hub cache folder of a downloaded repo (never written to), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # only locates the cache; loading reports real problems
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def _required_extra_inputs(model: nn.Module) -> list[str]:
    """Inputs besides ``pixel_values`` that the model's forward uses to read its pixels (SigLIP-2: a pixel
    attention mask and the patches' spatial shapes), found from the forward's signature."""
    import inspect

    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return []
    return [name for name in ("pixel_attention_mask", "spatial_shapes") if name in parameters]


def load_teacher(
    teacher: nn.Module | str,
    *,
    image_processor: Any = None,
    view: ImageView | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | None = None,
) -> Teacher:
    """Loads and validates a teacher.

    Args:
        teacher: A transformers image-classification model, or a Hub id / local path loadable with
            ``AutoModelForImageClassification`` (TimmWrapper checkpoints included).
        image_processor: The teacher's image processor; when None it is loaded from the same id, or the view
            falls back to the model config's image size with ImageNet statistics.
        view: The teacher view the training data was prepared with: used when the teacher has no image
            processor (no warning then), checked against it otherwise.
        revision: Hub revision (branch, tag or commit) of the teacher.
        token: Hub token.
        trust_remote_code: Whether to allow custom modelling code from the Hub.
        cache_dir: Download cache.

    Returns:
        A frozen :class:`Teacher` in eval mode.

    Raises:
        TeacherLoadError: (a ``ValueError``) a missing path, a folder without config.json or weights, a corrupt
            config.json / preprocessor_config.json, truncated weights, a model that is not an image classifier,
            a Hub id that cannot be reached; the message names the path and the file.
    """
    name_or_path = source_dir = None
    view_source = "image_processor"
    if isinstance(teacher, str):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        name_or_path = teacher
        local = os.path.exists(os.path.expanduser(teacher))
        if local:
            source_dir = os.path.realpath(os.path.expanduser(teacher))
            _check_teacher_folder(source_dir)
        elif not _HUB_ID.match(teacher) or teacher.startswith((".", "/", "~")):
            raise _fail(teacher, "no such folder.", "Give the folder of a saved model or a Hub id (org/name).")
        kwargs = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
        try:
            model = AutoModelForImageClassification.from_pretrained(teacher, **kwargs)
        except Exception as err:
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "Unrecognized configuration class" in str(err):
                problem = "its config is not that of an image classifier (" + problem + ")"
            if not local:
                problem = f"there is no local folder of that name, and as a Hub id: {problem}"
            hint = "" if local else "Check the path, or the Hub id, revision, token and network (HF_HUB_OFFLINE)."
            raise _fail(teacher, problem, hint) from err
        if not local:
            source_dir = _hub_snapshot(teacher, revision, cache_dir)
        if image_processor is None:
            has_file = not local or os.path.isfile(os.path.join(source_dir, "preprocessor_config.json"))
            try:
                image_processor = AutoImageProcessor.from_pretrained(teacher, **kwargs) if has_file else None
            except Exception as err:
                if local:
                    raise _fail(teacher, f"its preprocessor_config.json cannot be read ({err}).") from err
                image_processor = None  # a Hub repo without a processor: the config's size is used
    else:
        model = teacher
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if name_or_path and os.path.isdir(name_or_path):
            source_dir = os.path.realpath(name_or_path)
    if not is_image_classifier(model):
        raise TeacherLoadError(
            f"The teacher must be a transformers image classifier (a PreTrainedModel such as "
            f"ViTForImageClassification, SwinForImageClassification, ConvNextForImageClassification or "
            f"TimmWrapperForImageClassification); got {type(model).__name__}. A timm model can be used as a "
            "teacher through TimmWrapperForImageClassification."
        )
    extra_inputs = _required_extra_inputs(model)
    if extra_inputs:
        # Refused here, not at step 1 inside transformers: pat_hf feeds teachers images (pixel_values) only.
        raise TeacherLoadError(
            f"The teacher {type(model).__name__} takes pre-patchified input with {' and '.join(extra_inputs)} "
            "besides pixel_values (SigLIP-2's NaFlex format), which pat_hf does not build: no distillation method "
            "can feed it. Use a teacher that takes images (pixel_values) alone, e.g. a SigLIP (v1) or ViT classifier."
        )
    if image_processor is not None:
        own_view = ImageView.from_image_processor(image_processor, model.config)
    else:
        own_view = ImageView.from_config(model.config)
        view_source = "pretrained_cfg" if isinstance(getattr(model.config, "pretrained_cfg", None), dict) else "config"
        if view_source == "config" and view is None:
            logger.warning(
                "No image processor for the teacher: assuming %dx%d input with ImageNet mean/std. Pass "
                "teacher_image_processor= (or build the dataset with a teacher view) to set its preprocessing.",
                *own_view.size,
            )
    loaded = Teacher(
        model=model,
        view=own_view,
        name_or_path=name_or_path,
        revision=revision,
        view_source=view_source,
        source_dir=source_dir,
    )
    if view is not None:
        loaded.use_data_view(view)
    return loaded
