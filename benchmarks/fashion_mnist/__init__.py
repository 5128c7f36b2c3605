"""A reproducible distillation study on real data: Fashion-MNIST, two heterogeneous pairs, four methods.

``benchmarks/fashion_mnist_study.py`` is the command line; this package holds the machinery so that it can be
tested:

- the data (:mod:`.data`): Fashion-MNIST as uint8 tensors, a fixed class-balanced student subset, a validation
  split carved from the remaining training images; :class:`pat_hf.data.TensorBatchCollator` augments (pad +
  random crop, horizontal flip) and normalises whole batches on tensors — per-image PIL transforms would
  bottleneck a GPU;
- the models (:mod:`.config`, :mod:`.training`): a small transformers ViT and ConvNeXt as teachers (trained
  from scratch with ``distill_method="none"``, cached on disk), a small timm ResNet and a small timm DeiT as
  students;
- the runs (:mod:`.runs`): every teacher and every student/method/seed writes one JSON file (accuracies, wall
  time, settings, device, versions, logged loss parts); a run whose JSON exists is skipped, so the study resumes;
- the report (:mod:`.summary`, :mod:`.report`): ``docs/results.md`` and ``docs/results.png`` are generated from
  those JSON files only.
"""

from .config import (
    ABLATIONS,
    IMAGE_SIZE,
    METHODS,
    OFA_WEIGHTS,
    PAIRS,
    PAT_SETTINGS,
    RSD_SETTINGS,
    RSD_SWEEP,
    STUDENT_RECIPES,
    STUDENT_TRAINING_RECIPES,
    TEACHER_BATCH_SIZE,
    TEACHER_EPOCHS,
    TEACHER_RECIPES,
    StudyConfig,
    config_from_dict,
)
from .data import FashionTensors, StudyData, load_study_data
from .report import write_report
from .runs import RunSpec, plan_runs, run_study
from .summary import load_runs, summarise
from .training import build_student, build_teacher, count_params, top1_metrics

__all__ = [
    "ABLATIONS",
    "IMAGE_SIZE",
    "METHODS",
    "OFA_WEIGHTS",
    "PAIRS",
    "PAT_SETTINGS",
    "RSD_SETTINGS",
    "RSD_SWEEP",
    "STUDENT_RECIPES",
    "STUDENT_TRAINING_RECIPES",
    "TEACHER_BATCH_SIZE",
    "TEACHER_EPOCHS",
    "TEACHER_RECIPES",
    "FashionTensors",
    "RunSpec",
    "StudyConfig",
    "StudyData",
    "build_student",
    "build_teacher",
    "config_from_dict",
    "count_params",
    "load_runs",
    "load_study_data",
    "plan_runs",
    "run_study",
    "summarise",
    "top1_metrics",
    "write_report",
]
