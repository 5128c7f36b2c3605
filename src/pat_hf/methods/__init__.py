"""Distillation methods and their registry.

- :mod:`.base`: the interface (:class:`DistillationMethod`, the batch and output types, shared helpers);
- :mod:`.registry`: names to classes (:func:`register_method`, :func:`get_method`, :func:`available_methods`);
- :mod:`.kd`: ``none`` and ``kd``; :mod:`.ofa`: ``ofa`` and its branch heads; :mod:`.pat`: ``pat``, its prompts,
  region-aware attention and aligners;
- the baselines of the PAT paper: :mod:`.dkd` (``dkd``), :mod:`.dist` (``dist``), :mod:`.fitnet` (``fitnet`` and its
  hint connectors).

A new method subclasses :class:`DistillationMethod` and registers itself with :func:`register_method`; the
trainer finds it by ``PATTrainingArguments.distill_method``.
"""

from .base import DistillationBatch, DistillationMethod, DistillationOutput
from .dist import DISTDistillation
from .dkd import DecoupledKnowledgeDistillation
from .fitnet import FitNetDistillation
from .kd import KnowledgeDistillation, NoDistillation
from .ofa import OFADistillation
from .pat import PerspectiveAwareTeaching
from .registry import available_methods, get_method, loss_parts_table, register_method

__all__ = [
    "DISTDistillation",
    "DecoupledKnowledgeDistillation",
    "DistillationBatch",
    "DistillationMethod",
    "DistillationOutput",
    "FitNetDistillation",
    "KnowledgeDistillation",
    "NoDistillation",
    "OFADistillation",
    "PerspectiveAwareTeaching",
    "available_methods",
    "get_method",
    "loss_parts_table",
    "register_method",
]
