"""Evaluation metrics that work offline: a top-k accuracy `evaluate` module shipped with the package."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["ACCURACY_TOPK_PATH", "build_compute_metrics", "load_accuracy_metric"]

ACCURACY_TOPK_PATH = os.path.join(os.path.dirname(__file__), "accuracy_topk", "accuracy_topk.py")


def load_accuracy_metric() -> Any:
    """``evaluate.load`` of the shipped top-k accuracy module (no network needed)."""
    import evaluate

    return evaluate.load(ACCURACY_TOPK_PATH)


def build_compute_metrics(top_k: Sequence[int] = (1, 5)) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` for Trainer reporting ``accuracy`` (top-1) and ``top5_accuracy``.

    Args:
        top_k: The k values; k >= the number of classes is skipped.
    """
    metric = load_accuracy_metric()

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        return metric.compute(predictions=np.asarray(logits), references=np.asarray(labels), top_k=tuple(top_k))

    return compute_metrics
