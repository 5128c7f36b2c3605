"""The frozen teacher: loading, validation, class mapping and its forward pass.

The teacher is a `transformers` image classifier (ViT, DeiT, BEiT, Swin, ConvNeXt, ResNet, any timm model
through TimmWrapper, ...). It is never trained: frozen, always in eval mode, not a submodule of the trainable
wrapper (so it stays out of the optimizer, DDP and checkpoints).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .preprocessing import ImageView

__all__ = ["Teacher", "load_teacher", "match_classes", "model_label_names"]

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
    """

    model: nn.Module
    view: ImageView
    name_or_path: str | None = None
    revision: str | None = None
    class_index: torch.Tensor | None = None
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


def model_label_names(model: nn.Module) -> list[str] | None:
    """The class names of a transformers model, or None when it only has transformers' LABEL_i defaults."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None)
    if not id2label:
        return None
    names = (
        [str(id2label[i]) for i in sorted(int(k) for k in id2label)]
        if isinstance(next(iter(id2label)), int)
        else [str(id2label[k]) for k in sorted(id2label, key=int)]
    )
    if all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def match_classes(
    teacher_names: list[str] | None,
    teacher_count: int,
    dataset_names: list[str] | None,
    dataset_count: int | None,
) -> torch.Tensor | None:
    """Maps the teacher's classes onto the dataset's.

    When both sides name their classes, they are matched by name (case, spaces, ``_`` and ``-`` ignored), so
    a teacher with more classes or another order still works. When only counts are known they must agree.

    Args:
        teacher_names: The teacher's class names, or None.
        teacher_count: The teacher's number of outputs.
        dataset_names: The dataset's class names, or None.
        dataset_count: The dataset's number of classes, or None when unknown.

    Returns:
        None when the teacher's outputs are already in dataset order, else an index tensor such that
        ``teacher_logits[:, index]`` is in dataset order.

    Raises:
        ValueError: When the classes cannot be matched.
    """
    if teacher_names is not None and dataset_names is not None:
        if teacher_names == list(dataset_names):
            return None
        lookup = {}
        for i, name in enumerate(teacher_names):
            lookup.setdefault(_normalise(name), i)
        missing = [n for n in dataset_names if _normalise(n) not in lookup]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ValueError(
                f"The teacher does not know {len(missing)} of the dataset's {len(dataset_names)} classes: {shown}. "
                f"Teacher classes start with {teacher_names[:5]}. Use a teacher fine-tuned on this dataset's "
                "classes, or rename the dataset's ClassLabel names to the teacher's (config.id2label)."
            )
        index = [lookup[_normalise(n)] for n in dataset_names]
        if index == list(range(teacher_count)):
            return None
        logger.info(
            "Teacher classes matched to the dataset's by name (reordered/selected %d of %d).", len(index), teacher_count
        )
        return torch.tensor(index, dtype=torch.long)
    if dataset_count is not None and dataset_count != teacher_count:
        raise ValueError(
            f"The teacher predicts {teacher_count} classes but the dataset has {dataset_count}, and their classes "
            "cannot be matched by name (the teacher's config.id2label or the dataset's ClassLabel names are "
            "missing). Give both class names, or use a teacher with the same number of classes."
        )
    return None


def load_teacher(
    teacher: nn.Module | str,
    *,
    image_processor: Any = None,
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
        revision: Hub revision (branch, tag or commit) of the teacher.
        token: Hub token.
        trust_remote_code: Whether to allow custom modelling code from the Hub.
        cache_dir: Download cache.

    Returns:
        A frozen :class:`Teacher` in eval mode.

    Raises:
        ValueError: When the teacher cannot be loaded or is not an image classifier.
    """
    name_or_path = None
    if isinstance(teacher, str):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        name_or_path = teacher
        kwargs = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
        try:
            model = AutoModelForImageClassification.from_pretrained(teacher, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(
                f"Could not load the teacher {teacher!r} as an image classifier with "
                f"AutoModelForImageClassification: {err}"
            ) from err
        if image_processor is None:
            try:
                image_processor = AutoImageProcessor.from_pretrained(teacher, **kwargs)
            except (OSError, ValueError, KeyError):
                image_processor = None
    else:
        model = teacher
        name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if not is_image_classifier(model):
        raise ValueError(
            f"The teacher must be a transformers image classifier (a PreTrainedModel such as "
            f"ViTForImageClassification, SwinForImageClassification, ConvNextForImageClassification or "
            f"TimmWrapperForImageClassification); got {type(model).__name__}. A timm model can be used as a "
            "teacher through TimmWrapperForImageClassification."
        )
    if image_processor is not None:
        view = ImageView.from_image_processor(image_processor, model.config)
    else:
        view = ImageView.from_config(model.config)
        if not isinstance(getattr(model.config, "pretrained_cfg", None), dict):
            logger.warning(
                "No image processor for the teacher: assuming %dx%d input with ImageNet mean/std. Pass "
                "teacher_image_processor= to set its preprocessing.",
                *view.size,
            )
    return Teacher(model=model, view=view, name_or_path=name_or_path, revision=revision)
