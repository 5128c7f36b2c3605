"""pat_hf: Perspective-Aware Teaching (PAT), OFA-KD and KD for heterogeneous image classifiers, on
transformers' Trainer with timm students.

Example:
    >>> from pat_hf import PATDistillationTrainer, PATTrainingArguments
    >>> args = PATTrainingArguments("out", distill_method="kd")
    >>> trainer = PATDistillationTrainer(model="resnet18", teacher="org/vit-teacher", args=args,
    ...                                  train_dataset=train, eval_dataset=val)
"""

from .version import __version__  # noqa: I001  (first: every module below may read it)

from . import _compat

from .data.augment import AugmentationConfig
from .data.datasets import load_fashion_mnist, with_image_transforms
from .data.mixup import PairedMixup
from .data.views import ImageView
from .errors import (
    CheckpointSaveError,
    DivergedLossError,
    HubPushError,
    NonFiniteLossError,
    RunLockedError,
    StudentLoadError,
    StudentUnchangedError,
)
from .methods import DistillationMethod, available_methods, get_method, register_method
from .metrics import build_compute_metrics
from .models.export import export_student, load_student_weights
from .models.student import create_student
from .models.teacher import Teacher, load_teacher
from .training.configuration import PATTrainingArguments
from .training.ema import ModelEmaCallback
from .training.modeling import build_distillation_model
from .training.trainer import PATDistillationTrainer

_compat.install()  # the 0.2 module paths (pat_hf.training.trainer, ...) keep working for one release, with a warning

__all__ = [
    "AugmentationConfig",
    "CheckpointSaveError",
    "DistillationMethod",
    "DivergedLossError",
    "HubPushError",
    "ImageView",
    "ModelEmaCallback",
    "NonFiniteLossError",
    "PATDistillationTrainer",
    "PATTrainingArguments",
    "PairedMixup",
    "RunLockedError",
    "StudentLoadError",
    "StudentUnchangedError",
    "Teacher",
    "__version__",
    "available_methods",
    "build_compute_metrics",
    "build_distillation_model",
    "create_student",
    "export_student",
    "get_method",
    "load_fashion_mnist",
    "load_student_weights",
    "load_teacher",
    "register_method",
    "with_image_transforms",
]
