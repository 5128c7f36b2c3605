"""The offline top-k metric and the method registry."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import EvalPrediction

from pat_hf import DistillationMethod, available_methods, build_compute_metrics, get_method, register_method
from pat_hf.metrics import load_accuracy_metric


def test_topk_accuracy_values():
    metric = load_accuracy_metric()
    scores = np.array(
        [
            [0.9, 0.05, 0.03, 0.01, 0.005, 0.005],  # label 0: rank 0
            [0.1, 0.2, 0.3, 0.15, 0.15, 0.1],  # label 5: rank 4 (ties with 0 count in its favour)
            [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],  # label 1: rank 1 (ties with others)
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: rank 5
        ]
    )
    labels = [0, 5, 1, 0]
    result = metric.compute(predictions=scores, references=labels, top_k=(1, 2, 5))
    assert result == {"accuracy": 0.25, "top2_accuracy": 0.5, "top5_accuracy": 0.75}


def test_compute_metrics_skips_k_not_below_the_class_count():
    compute = build_compute_metrics()
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    out = compute(EvalPrediction(predictions=logits, label_ids=np.array([0, 0])))
    assert out == {"accuracy": 0.5}


def test_registry_lists_and_rejects():
    assert {"none", "kd"} <= set(available_methods())
    assert get_method("kd").name == "kd"
    with pytest.raises(ValueError, match="Unknown distillation method 'nope'; registered methods: "):
        get_method("nope")


def test_register_a_custom_method_and_refuse_duplicates():
    @register_method
    class Dummy(DistillationMethod):
        name = "dummy_test_method"

    assert get_method("dummy_test_method") is Dummy
    with pytest.raises(ValueError, match="already registered"):

        @register_method
        class Other(DistillationMethod):
            name = "dummy_test_method"

    with pytest.raises(ValueError, match="non-empty `name`"):

        @register_method
        class Nameless(DistillationMethod):
            pass
