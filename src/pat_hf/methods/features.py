"""What a method reads from each model (logits, the penultimate embedding, the stage features) and the shapes
its heads are built from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..models.taps import StageSpec, build_embedding_tap, build_taps

if TYPE_CHECKING:
    pass


READABLE = ("logits", "embedding", "stages")
"""What a method can declare in :attr:`DistillationMethod.reads`."""


@dataclass
class Features:
    """What one model's pass produced, as far as the method declared it reads it.

    Args:
        logits: (B, K) logits (the teacher's in dataset class order).
        embedding: (B, D) penultimate embedding, the classifier's input (with ``"embedding"`` in ``reads``).
        stages: The model's stage features (1-4, as many as it has) in canonical layout (:class:`~pat_hf.models.taps.StageSpec`: maps (B, C, H, W),
            tokens (B, P + H·W, C)), with ``"stages"`` in ``reads``.
    """

    logits: torch.Tensor
    embedding: torch.Tensor | None = None
    stages: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class ModelShapes:
    """One model's shapes, measured by probe forwards before training.

    Args:
        num_classes: K, the logits' width.
        embedding: D, the penultimate embedding's width (with ``"embedding"`` in ``reads``).
        stages: The layouts of the model's stage features (1-4) (with ``"stages"`` in ``reads``).
    """

    num_classes: int
    embedding: int | None = None
    stages: tuple[StageSpec, ...] | None = None


@dataclass(frozen=True)
class Shapes:
    """What :meth:`DistillationMethod.build` is given: the student's and the teacher's shapes (None: no teacher)."""

    student: ModelShapes
    teacher: ModelShapes | None


class _Reader:
    """The taps one model is read through (hooks only, no parameters: never module state)."""

    def __init__(self, model: nn.Module, reads: tuple[str, ...], image_size: tuple[int, int] | None) -> None:
        self.embedding = build_embedding_tap(model, image_size) if "embedding" in reads else None
        self.stages = build_taps(model, image_size=image_size) if "stages" in reads else None

    def shapes(self, num_classes: int) -> ModelShapes:
        return ModelShapes(
            num_classes=num_classes,
            embedding=self.embedding.dim if self.embedding is not None else None,
            stages=tuple(self.stages.output_specs) if self.stages is not None else None,
        )

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, Any]]:
        """Yields a dict that holds, after the block, ``embedding`` and ``stages`` as declared."""
        found: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            embedding = stack.enter_context(self.embedding.capture()) if self.embedding is not None else None
            stages = stack.enter_context(self.stages.capture()) if self.stages is not None else None
            yield found
        if embedding is not None:
            if len(embedding) != 1:
                raise RuntimeError(
                    "the penultimate embedding was not captured: was the method called with the model it was built for?"
                )
            found["embedding"] = embedding[0]
        if stages is not None:
            expected = len(self.stages.output_specs)  # 1-4: the stages the model has (docs/architectures.md)
            if len(stages) != expected or any(f is None for f in stages):
                raise RuntimeError(
                    f"captured {len(stages)} stage features, expected {expected}: was the method called with "
                    "the model it was built for?"
                )
            found["stages"] = list(stages)
