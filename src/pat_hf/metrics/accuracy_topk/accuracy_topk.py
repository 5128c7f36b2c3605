"""Top-k accuracy as an `evaluate` metric module, shipped with pat_hf so it loads offline.

Load it with ``evaluate.load(pat_hf.metrics.ACCURACY_TOPK_PATH)``; ``evaluate.load("accuracy")`` needs the Hub.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-k accuracy: the fraction of examples whose label is among the k highest scores."
_KWARGS_DESCRIPTION = """
Args:
    predictions: Per-example class scores (logits or probabilities), shape (N, K).
    references: Per-example class indices, shape (N,).
    top_k: The k values to report (default (1, 5)); a k >= K is skipped (it would always be 1).
Returns:
    accuracy: top-1 accuracy; top{k}_accuracy for every other k.
Examples:
    >>> metric = evaluate.load(path)
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1], top_k=(1,))
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AccuracyTopK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, top_k=(1, 5)):
        scores = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or len(scores) != len(labels):
            raise ValueError(f"predictions must be (N, K) scores for N={len(labels)} references, got {scores.shape}")
        # Rank of the true class = number of classes scoring strictly higher; ties count in the example's favour.
        true_scores = scores[np.arange(len(labels)), labels]
        rank = (scores > true_scores[:, None]).sum(axis=1)
        results = {}
        for k in top_k:
            if k != 1 and k >= scores.shape[1]:
                continue
            results["accuracy" if k == 1 else f"top{k}_accuracy"] = float((rank < k).mean())
        return results
