"""A teacher's classes: their names, ambiguous names, and matching them to a dataset's classes."""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ..data.datasets import normalise_class_name
from ..errors import LabelError

logger = logging.getLogger(__name__)
_normalise = normalise_class_name


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


def ambiguous_names(names: list[str] | None) -> dict[str, list[tuple[int, str]]]:
    """The names that the matching by name cannot tell apart: each normalised name held by several entries of
    ``names`` (ImageNet's two "crane" classes, "Cat" and "cat"), mapped to those entries' (index, name).

    Args:
        names: Class names in output order, or None.
    """
    groups: dict[str, list[tuple[int, str]]] = {}
    for i, name in enumerate(names or []):
        groups.setdefault(_normalise(name), []).append((i, str(name)))
    return {key: entries for key, entries in groups.items() if len(entries) > 1}


def describe_ambiguous(groups: dict[str, list[tuple[int, str]]], limit: int = 5) -> str:
    """``'crane' (classes 134, 517)``-style listing of :func:`ambiguous_names`' groups."""
    parts = []
    for entries in list(groups.values())[:limit]:
        shown = " and ".join(repr(n) for n in dict.fromkeys(n for _, n in entries))
        parts.append(f"{shown} (classes {', '.join(str(i) for i, _ in entries)})")
    return "; ".join(parts) + (" ..." if len(groups) > limit else "")


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
        ValueError: When the classes cannot be matched. LabelError (a ValueError): names that the matching
            cannot tell apart (the dataset's names equal up to case / spaces, or a name the teacher holds twice).
    """
    if teacher_names is not None and dataset_names is not None:
        if teacher_names == list(dataset_names):
            return None
        # A dataset name the teacher holds exactly once is matched to it, whatever other names look alike; the
        # others are matched ignoring case, spaces, "_" and "-", where names equal up to that cannot be told apart.
        exact: dict[str, list[int]] = {}
        for i, name in enumerate(teacher_names):
            exact.setdefault(name, []).append(i)
        clash = {
            key: entries
            for key, entries in ambiguous_names(list(dataset_names)).items()
            if len({n for _, n in entries}) < len(entries) or any(len(exact.get(n, [])) != 1 for _, n in entries)
        }
        if clash:
            raise LabelError(
                f"The dataset names classes alike (the same name twice, or names that differ only in case, spaces, '_' or "
                f"'-'): {describe_ambiguous(clash)}. "
                "pat_hf matches classes by name ignoring those, so they would become one class. Rename them "
                "(datasets.ClassLabel(names=...)) so that each class has its own name."
            )
        wanted = {_normalise(n) for n in dataset_names if len(exact.get(n, [])) != 1}
        clash = {k: v for k, v in ambiguous_names(teacher_names).items() if k in wanted}
        if clash:
            raise LabelError(
                "The teacher's config.id2label holds the same class name more than once (up to case, spaces, '_' and '-'): "
                f"{describe_ambiguous(clash)}, "
                "and the dataset uses that name, so which teacher output is meant cannot be told. Rename the dataset's "
                "class to the one meant (e.g. 'crane (bird)'), and the teacher's id2label entries to match, or pass "
                "class_names= in the teacher's exact order."
            )
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
        index = [exact[n][0] if len(exact.get(n, [])) == 1 else lookup[_normalise(n)] for n in dataset_names]
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
