"""Distillation methods and their registry.

``none`` and ``kd`` live in :mod:`.kd`, ``ofa`` in :mod:`.ofa`, ``pat`` in :mod:`.pat`. A new method subclasses :class:`DistillationMethod` and registers
itself with :func:`register_method`; the trainer finds it by ``PATTrainingArguments.distill_method``.
"""

from .base import (
    DistillationBatch,
    DistillationMethod,
    DistillationOutput,
    available_methods,
    get_method,
    register_method,
)
from .kd import KnowledgeDistillation, NoDistillation
from .ofa import OFADistillation
from .pat import PerspectiveAwareTeaching

__all__ = [
    "DistillationBatch",
    "DistillationMethod",
    "DistillationOutput",
    "KnowledgeDistillation",
    "NoDistillation",
    "OFADistillation",
    "PerspectiveAwareTeaching",
    "available_methods",
    "get_method",
    "register_method",
]
