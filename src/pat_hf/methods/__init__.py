"""Distillation methods and their registry.

- :mod:`.base`: the interface (:class:`DistillationMethod`, the batch and output types, shared helpers);
- :mod:`.registry`: names to classes (:func:`register_method`, :func:`get_method`, :func:`available_methods`);
- :mod:`.kd`: ``none`` and ``kd``; :mod:`.ofa`: ``ofa`` and its branch heads; :mod:`.pat`: ``pat``, its prompts,
  region-aware attention and aligners;
- the baselines of the PAT paper: :mod:`.dkd` (``dkd``), :mod:`.dist` (``dist``), :mod:`.fitnet` (``fitnet`` and its
  hint connectors); :mod:`.rsd` (``rsd``, redundancy suppression with its AAD module).

A new method subclasses :class:`DistillationMethod` (declaring what it reads, building its heads from the shapes it
is given, returning named loss parts: docs/extending.md) and registers itself with :func:`register_method`; the
trainer finds it by ``PATTrainingArguments.distill_method``.
"""

from .base import DistillationBatch, DistillationMethod, DistillationOutput, Features, ModelShapes, Shapes
from .dist import DISTDistillation
from .dkd import DecoupledKnowledgeDistillation
from .fitnet import FitNetDistillation
from .kd import KnowledgeDistillation, NoDistillation
from .ofa import OFADistillation
from .pat import PerspectiveAwareTeaching
from .registry import available_methods, get_method, loss_parts_table, register_method
from .rsd import RedundancySuppressionDistillation

__all__ = [
    "DISTDistillation",
    "DecoupledKnowledgeDistillation",
    "DistillationBatch",
    "DistillationMethod",
    "DistillationOutput",
    "Features",
    "FitNetDistillation",
    "KnowledgeDistillation",
    "ModelShapes",
    "NoDistillation",
    "OFADistillation",
    "PerspectiveAwareTeaching",
    "RedundancySuppressionDistillation",
    "Shapes",
    "available_methods",
    "get_method",
    "loss_parts_table",
    "register_method",
]
