"""The PAT paper's baselines: DKD, DIST and FitNet (losses against hand-computed values, the methods, the trainer,
checkpoints, model cards and the recipes)."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.losses import dist_losses, dkd_losses, hard_targets, hint_loss, kl_div_loss, pearson_correlation
from pat_hf.methods import (
    DecoupledKnowledgeDistillation,
    DISTDistillation,
    DistillationBatch,
    FitNetDistillation,
    available_methods,
    get_method,
)
from pat_hf.methods.dkd import dkd_warmup_weight
from pat_hf.methods.fitnet import HintConnector
from pat_hf.models.model_card import CITATIONS, ModelCardInfo, build_model_card
from pat_hf.models.taps import StageSpec, map_to_tokens
from pat_hf.models.teacher import load_teacher
from support.tiny import TEACHER_FAMILIES, make_image_dataset, tiny_args, tiny_teacher
from test_pat import STUDENT_FAMILIES, processor_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = {"rtol": 1e-5, "atol": 1e-6}


def logits_of(*probabilities: list[float]) -> torch.Tensor:
    """Logits whose softmax is the given rows of probabilities."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_the_registry_lists_every_method():
    assert available_methods() == ["dist", "dkd", "fitnet", "kd", "none", "ofa", "pat", "rsd"]
    assert get_method("dkd") is DecoupledKnowledgeDistillation
    assert get_method("dist") is DISTDistillation
    assert get_method("fitnet") is FitNetDistillation


# ---- DKD loss ------------------------------------------------------------------------------------------------


def test_dkd_is_zero_for_identical_logits():
    z = torch.randn(5, 7)
    tckd, nckd = dkd_losses(z, z.clone(), torch.tensor([0, 3, 6, 2, 2]), temperature=2.0)
    assert tckd.item() == pytest.approx(0.0, abs=1e-6) and nckd.item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_hand_computed():
    # Target class 0. Student p = (1/2, 1/4, 1/4), teacher p = (1/4, 1/2, 1/4).
    student, teacher = logits_of([0.5, 0.25, 0.25]), logits_of([0.25, 0.5, 0.25])
    tckd, nckd = dkd_losses(student, teacher, torch.tensor([0]), temperature=1.0)
    # Binary (target, rest): b_s = (1/2, 1/2), b_t = (1/4, 3/4).
    expected_tckd = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    # Non-target classes renormalised: p̂_s = (1/2, 1/2), p̂_t = (2/3, 1/3).
    expected_nckd = (2 / 3) * math.log((2 / 3) / 0.5) + (1 / 3) * math.log((1 / 3) / 0.5)
    assert tckd.item() == pytest.approx(expected_tckd, rel=1e-5)
    assert nckd.item() == pytest.approx(expected_nckd, rel=1e-5)
    # Batch mean: a second, identical sample leaves both unchanged.
    tckd2, nckd2 = dkd_losses(torch.cat([student, student]), torch.cat([teacher, teacher]), torch.tensor([0, 0]), 1.0)
    assert (tckd2.item(), nckd2.item()) == pytest.approx((tckd.item(), nckd.item()), rel=1e-5)


def test_dkd_decomposes_kd():
    """The paper's identity: KD = TCKD + (1 − p_t^target)·NCKD, per sample, at any temperature."""
    torch.manual_seed(0)
    for temperature in (1.0, 4.0):
        s, t = torch.randn(1, 6) * 3, torch.randn(1, 6) * 3
        label = torch.tensor([2])
        tckd, nckd = dkd_losses(s, t, label, temperature)
        teacher_target = torch.softmax(t / temperature, -1)[0, 2]
        expected = kl_div_loss(s, t, temperature)
        torch.testing.assert_close(tckd + (1 - teacher_target) * nckd, expected, **TOL)


def test_dkd_temperature_scaling():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    T = 4.0
    scaled = dkd_losses(s * T, t * T, y, temperature=T)
    plain = dkd_losses(s, t, y, temperature=1.0)
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b * T**2, **TOL)
    with pytest.raises(ValueError, match="temperature"):
        dkd_losses(s, t, y, temperature=0.0)


def test_dkd_soft_targets_use_their_argmax_class():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    soft = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1], [0.05, 0.05, 0.3, 0.6]])
    hard = torch.tensor([1, 0, 3])
    assert torch.equal(hard_targets(soft, 4), hard) and torch.equal(hard_targets(hard, 4), hard)
    for a, b in zip(dkd_losses(s, t, soft), dkd_losses(s, t, hard)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="soft targets"):
        hard_targets(torch.zeros(3, 5), 4)


def test_dkd_gradients_reach_the_student_only_and_stay_finite_when_confident():
    s = torch.tensor([[60.0, 0.0, -60.0], [0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 60.0, 0.0], [2.0, 1.0, 0.0]], requires_grad=True)
    tckd, nckd = dkd_losses(s, t, torch.tensor([0, 2]), temperature=1.0)
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    (tckd + nckd).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


# ---- DIST loss -----------------------------------------------------------------------------------------------


def test_dist_is_zero_for_identical_logits():
    z = torch.randn(6, 5) * 2
    inter, intra = dist_losses(z, z.clone(), temperature=3.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-4) and intra.item() == pytest.approx(0.0, abs=1e-4)


def test_dist_hand_computed_two_classes():
    # With 2 classes a centred row is (a, −a): the correlation of two rows is the sign of the product of their a.
    student = logits_of([0.75, 0.25], [0.3, 0.7])
    teacher = logits_of([0.6, 0.4], [0.8, 0.2])
    inter, intra = dist_losses(student, teacher, temperature=1.0)
    assert inter.item() == pytest.approx(1 - (1 + -1) / 2, abs=1e-6)  # +1 for the first image, −1 for the second
    # Per class over the batch: class 0 (0.75, 0.3) against (0.6, 0.8): −1; class 1 likewise: −1.
    assert intra.item() == pytest.approx(1 - (-1), abs=1e-6)


def test_dist_matches_numpy_correlations():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    T = 2.0
    y_s, y_t = torch.softmax(s / T, -1).numpy(), torch.softmax(t / T, -1).numpy()
    rows = np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(5)])
    columns = np.mean([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(7)])
    inter, intra = dist_losses(s, t, temperature=T)
    assert inter.item() == pytest.approx((1 - rows) * T**2, rel=1e-5)
    assert intra.item() == pytest.approx((1 - columns) * T**2, rel=1e-5)
    np.testing.assert_allclose(pearson_correlation(s, t).numpy(), [np.corrcoef(a, b)[0, 1] for a, b in zip(s, t)])


def test_dist_temperature_scaling():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    T = 4.0
    for a, b in zip(dist_losses(s, t, T), dist_losses(s / T, t / T, 1.0)):
        torch.testing.assert_close(a, b * T**2, **TOL)


def test_dist_gradients_and_a_batch_of_one():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    inter, intra = dist_losses(s, t)
    (inter + intra).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    one = torch.randn(1, 5, requires_grad=True)
    inter, intra = dist_losses(one, torch.randn(1, 5), temperature=2.0)
    assert intra.item() == pytest.approx(4.0)  # no relation across a batch of one: the constant T²
    (inter + intra).backward()
    assert torch.isfinite(one.grad).all()


# ---- FitNet hint loss and connectors -------------------------------------------------------------------------


def test_hint_loss_hand_computed_and_teacher_detached():
    a = torch.zeros(2, 3, 2, 2, requires_grad=True)
    f = torch.zeros(2, 3, 2, 2, requires_grad=True)
    with torch.no_grad():
        f[0, 0] = 2.0  # 4 of 24 elements differ by 2
    loss = hint_loss(a, f)
    assert loss.item() == pytest.approx(4 * 4 / 24)
    loss.backward()
    assert a.grad.abs().sum() > 0 and f.grad is None
    assert hint_loss(f, f.detach().clone()).item() == 0.0
    with pytest.raises(ValueError, match="equal shapes"):
        hint_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize(
    "student,teacher,mode",
    [
        (StageSpec("map", 8, 7, 7), StageSpec("map", 6, 7, 7), "same"),
        (StageSpec("map", 8, 56, 56), StageSpec("tokens", 12, 14, 14, prefix_tokens=1), "patch"),  # CNN -> ViT
        (StageSpec("tokens", 12, 14, 14, prefix_tokens=2), StageSpec("map", 6, 56, 56), "unpatch"),  # DeiT -> CNN
        (StageSpec("map", 8, 7, 7), StageSpec("tokens", 12, 14, 14, prefix_tokens=1), "unpatch"),  # CNN -> ViT
        (StageSpec("tokens", 12, 4, 4), StageSpec("map", 6, 8, 2), "resize"),  # finer in H, coarser in W
        (StageSpec("map", 8, 5, 5), StageSpec("map", 6, 4, 4), "resize"),
        (StageSpec("map", 8, 4, 4), StageSpec("map", 6, 6, 6), "resize"),
    ],
)
def test_connector_maps_any_layout_to_the_teacher_map(student, teacher, mode):
    connector = HintConnector(student, teacher)
    assert connector.mode == mode
    out = connector(torch.randn(*student.shape(2)))
    assert out.shape == (2, teacher.channels, teacher.height, teacher.width)


def test_connector_parameter_counts():
    # CNN 64@56 -> ViT 384@14: a 4x4 patch embedding; DeiT 192@14 -> ConvNeXt 96@56: 1x1 conv to 16 x 96.
    patch = HintConnector(StageSpec("map", 64, 56, 56), StageSpec("tokens", 384, 14, 14, 1))
    unpatch = HintConnector(StageSpec("tokens", 192, 14, 14, 1), StageSpec("map", 96, 56, 56))
    assert sum(p.numel() for p in patch.parameters()) == 64 * 384 * 16 + 384
    assert sum(p.numel() for p in unpatch.parameters()) == 192 * 96 * 16 + 96 * 16


def test_unpatch_spreads_each_channel_group_over_its_cell():
    connector = HintConnector(StageSpec("map", 8, 2, 3), StageSpec("map", 2, 4, 6))
    with torch.no_grad():
        connector.proj.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        connector.proj.bias.zero_()
    x = torch.randn(1, 8, 2, 3)
    out = connector(x)
    for c in range(2):
        for a in range(2):
            for b in range(2):
                torch.testing.assert_close(out[0, c, a::2, b::2], x[0, c * 4 + a * 2 + b])


def test_token_student_equals_its_patch_grid_and_prefix_tokens_are_dropped():
    torch.manual_seed(0)
    tokens = HintConnector(StageSpec("tokens", 8, 4, 4, prefix_tokens=2), StageSpec("map", 6, 2, 2))
    grid = HintConnector(StageSpec("map", 8, 4, 4), StageSpec("map", 6, 2, 2))
    grid.load_state_dict(tokens.state_dict())
    x = torch.randn(3, 8, 4, 4)
    prefix = torch.randn(3, 2, 8)
    torch.testing.assert_close(tokens(map_to_tokens(x, prefix)), grid(x))


@pytest.mark.parametrize("sizes", [((5, 5), (4, 4)), ((4, 4), (6, 6)), ((4, 4), (8, 2))])
def test_resize_commutes_with_the_projection(sizes):
    """Grids no integer factor relates: 1x1 convolution and resize commute exactly, so the connector may run the
    convolution on the smaller grid (area resize when the student grid has more cells, else bilinear)."""
    (hs, ws), (ht, wt) = sizes
    connector = HintConnector(StageSpec("map", 8, hs, ws), StageSpec("map", 6, ht, wt)).double()
    x = torch.randn(2, 8, hs, ws, dtype=torch.float64)
    mode, kwargs = ("area", {}) if hs * ws > ht * wt else ("bilinear", {"align_corners": False})
    project_first = F.interpolate(connector.proj(x), size=(ht, wt), mode=mode, **kwargs)
    resize_first = connector.proj(F.interpolate(x, size=(ht, wt), mode=mode, **kwargs))
    torch.testing.assert_close(project_first, resize_first)
    torch.testing.assert_close(connector(x), resize_first)


# ---- the methods ---------------------------------------------------------------------------------------------


def make(tmp_path, method: str, student=None, family: str = "vit", **overrides):
    student = student if student is not None else create_student("test_resnet", num_classes=3, img_size=20)
    teacher = load_teacher(tiny_teacher(family), image_processor=processor_for(family))
    return get_method(method)(tiny_args(tmp_path, distill_method=method, **overrides), student, teacher), student


def test_dkd_method_weights_and_warmup(tmp_path):
    method, _ = make(tmp_path, "dkd", dkd_alpha=0.5, dkd_beta=3.0, dkd_warmup_epochs=20, ce_weight=0.7, kd_weight=2.0)
    assert method.temperature == 4.0 and method.label_smoothing == 0.0
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    tckd, nckd = dkd_losses(s, t, y, 4.0)
    ce = F.cross_entropy(s, y)
    assert float(method.warmup_factor) == 0.0  # before any progress: epoch 0
    for epoch, factor in ((0.5, 0.025), (10.0, 0.5), (20.0, 1.0), (30.0, 1.0)):
        method.set_progress(epoch)
        assert float(method.warmup_factor) == pytest.approx(factor)
        out = method.compute_loss(s, t, y)
        expected = 0.7 * ce + 2.0 * factor * (0.5 * tckd + 3.0 * nckd)
        torch.testing.assert_close(out.loss, expected, **TOL)
        assert set(out.parts) == {"ce", "tckd", "nckd"}
        torch.testing.assert_close(out.parts["tckd"], tckd)
    assert dkd_warmup_weight(0.5, 20) == 0.025 and dkd_warmup_weight(7.0, 0.0) == 1.0
    assert "dkd_warmup_epochs" in method.settings() and "warmup_factor" not in method.state_dict()


def test_dkd_needs_labels_and_accepts_soft_targets(tmp_path):
    method, student = make(tmp_path, "dkd", dkd_warmup_epochs=0)
    teacher = load_teacher(tiny_teacher("vit"))
    pixels, teacher_pixels = torch.randn(3, 3, 20, 20), torch.randn(3, 3, 16, 16)
    with pytest.raises(ValueError, match="needs labels"):
        method(student, teacher, DistillationBatch(pixels, None, teacher_pixels))
    soft = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    s, t = torch.randn(3, 3), torch.randn(3, 3)
    out_soft, out_hard = method.compute_loss(s, t, soft), method.compute_loss(s, t, torch.tensor([0, 2, 1]))
    torch.testing.assert_close(out_soft.parts["tckd"], out_hard.parts["tckd"])
    torch.testing.assert_close(out_soft.parts["ce"], F.cross_entropy(s, soft))  # CE against the soft targets


def test_dist_method_weights_and_unlabelled_batches(tmp_path):
    method, _ = make(tmp_path, "dist", dist_beta=2.0, dist_gamma=0.5, temperature=4.0, kd_weight=3.0)
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    inter, intra = dist_losses(s, t, 4.0)
    out = method.compute_loss(s, t, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(s, y) + 3.0 * (2.0 * inter + 0.5 * intra), **TOL)
    assert set(out.parts) == {"ce", "dist_inter", "dist_intra"}
    unlabelled = method.compute_loss(s, t, None)
    assert "ce" not in unlabelled.parts
    torch.testing.assert_close(unlabelled.loss, 3.0 * (2.0 * inter + 0.5 * intra), **TOL)
    soft = torch.softmax(torch.randn(4, 3), -1)
    torch.testing.assert_close(method.compute_loss(s, t, soft).parts["ce"], F.cross_entropy(s, soft))


def test_fitnet_method_pairs_stages_and_sums_the_hints(tmp_path):
    student = create_student("test_resnet", num_classes=3, img_size=20)
    method, _ = make(
        tmp_path, "fitnet", student, "convnext", fitnet_stages=[4, 1], fitnet_teacher_stages=[2, 3], fitnet_weight=0.5
    )
    assert method.temperature == 1.0
    assert method.pairs == [(1, 3), (4, 2)]  # sorted by student stage, each keeping its teacher stage
    assert set(method.connectors) == {"s1_t3", "s4_t2"}
    assert method.settings()["fitnet_teacher_stages"] == [3, 2]
    torch.manual_seed(0)
    student_features = {1: torch.randn(2, 32, 5, 5), 4: torch.randn(2, 96, 1, 1)}
    teacher_features = {3: torch.randn(2, 32, 2, 2), 2: torch.randn(2, 16, 4, 4)}
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2])
    out = method.compute_loss(s, t, student_features, teacher_features, y)
    hint = F.mse_loss(method.connectors["s1_t3"](student_features[1]), teacher_features[3]) + F.mse_loss(
        method.connectors["s4_t2"](student_features[4]), teacher_features[2]
    )
    torch.testing.assert_close(out.parts["hint"], hint.detach())
    torch.testing.assert_close(out.loss, F.cross_entropy(s, y) + kl_div_loss(s, t, 1.0) + 0.5 * hint, **TOL)
    assert set(out.parts) == {"ce", "kd", "hint"}


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"distill_method": "dkd", "dkd_alpha": -1.0}, "dkd_alpha must be >= 0"),
        ({"distill_method": "dkd", "dkd_beta": float("inf")}, "dkd_beta must be >= 0"),
        ({"distill_method": "dkd", "dkd_warmup_epochs": -2.0}, "dkd_warmup_epochs must be >= 0"),
        ({"distill_method": "dist", "dist_beta": -0.1}, "dist_beta must be >= 0"),
        ({"distill_method": "dist", "dist_gamma": float("nan")}, "dist_gamma must be >= 0"),
        ({"distill_method": "fitnet", "fitnet_stages": []}, "one or more distinct stages"),
        ({"distill_method": "fitnet", "fitnet_stages": [2, 2]}, "one or more distinct stages"),
        ({"distill_method": "fitnet", "fitnet_stages": [5]}, "among 1, 2, 3, 4"),
        ({"distill_method": "fitnet", "fitnet_stages": [1, 2], "fitnet_teacher_stages": [3]}, "one teacher stage"),
        ({"distill_method": "fitnet", "fitnet_teacher_stages": [0, 1, 2, 3]}, "among 1, 2, 3, 4"),
        ({"distill_method": "fitnet", "fitnet_weight": -1.0}, "fitnet_weight must be >= 0"),
    ],
)
def test_out_of_range_settings_are_refused(tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_args(tmp_path, **overrides)


@pytest.mark.parametrize("family", TEACHER_FAMILIES)
@pytest.mark.parametrize("student_name,kwargs", STUDENT_FAMILIES, ids=[s for s, _ in STUDENT_FAMILIES])
def test_every_teacher_family_with_every_student_family(tmp_path, family, student_name, kwargs):
    """FitNet (whose connectors depend on both families): one optimizer step through the trainer. DKD and DIST
    (logits only) and RSD (penultimate embeddings, its AAD sized by both): one forward and backward of the method
    on the same pair."""
    torch.manual_seed(0)
    student = create_student(student_name, num_classes=3, **kwargs)
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher(family),
        args=tiny_args(tmp_path, distill_method="fitnet", max_steps=1, per_device_train_batch_size=4),
        train_dataset=with_image_transforms(make_image_dataset(n=4), view, None, train=True),
        teacher_image_processor=processor_for(family),
    )
    before = {k: v.clone() for k, v in student.state_dict().items() if v.is_floating_point()}
    connectors = {k: v.clone() for k, v in trainer.method.connectors.state_dict().items()}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if k in before)
    assert any(not torch.equal(connectors[k], v) for k, v in trainer.method.connectors.state_dict().items())
    teacher = trainer.teacher
    size = view.size
    batch = DistillationBatch(
        torch.randn(4, 3, *size), torch.tensor([0, 1, 2, 0]), torch.randn(4, 3, *teacher.view.size)
    )
    for name in ("dkd", "dist", "rsd"):
        method = get_method(name)(tiny_args(tmp_path, distill_method=name), student, teacher)
        method.set_progress(30.0)
        student.zero_grad()
        out = method(student, teacher, batch)
        out.loss.backward()
        assert torch.isfinite(out.loss), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), name
        assert all(p.grad is None for p in teacher.model.parameters())
        if name == "rsd":
            # (The biases before the BatchNorm and the standardisation get no gradient: a shift cancels out.)
            weights = [p for n, p in method.aad.named_parameters() if n.endswith("weight")]
            assert out.parts["rsd"] > 0 and all(p.grad.abs().sum() > 0 for p in weights)


# ---- through the trainer -------------------------------------------------------------------------------------


def build(tmp_path, method, family="swin", dataset=None, **overrides):
    torch.manual_seed(0)
    student = create_student("test_resnet", num_classes=3, img_size=20)
    dataset = dataset if dataset is not None else make_image_dataset()
    view = ImageView.from_timm(student)
    return PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher(family),
        args=tiny_args(tmp_path, distill_method=method, **overrides),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
        eval_dataset=with_image_transforms(dataset, view, None, train=False),
        teacher_image_processor=processor_for(family),
    )


@pytest.mark.parametrize(
    "method,parts",
    [("dkd", {"loss_ce", "loss_tckd", "loss_nckd"}), ("dist", {"loss_ce", "loss_dist_inter", "loss_dist_intra"})],
)
def test_logit_methods_train_and_log_their_parts(tmp_path, method, parts):
    trainer = build(tmp_path, method, "convnext", num_train_epochs=2)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.model.state_dict().items()}
    trainer.train()
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher.model.state_dict().items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(parts <= set(h) for h in logs)
    metrics = trainer.evaluate()
    assert {"eval_loss_ce", "eval_loss_kd", "eval_accuracy"} <= set(metrics)


def test_dkd_progress_follows_the_trainer_state_and_resume_is_exact(tmp_path):
    """The warm-up factor comes from TrainerState.epoch at every training forward; a run resumed from a checkpoint
    sees the same values as an uninterrupted one and ends with the same weights."""

    def record(trainer):
        seen: list[float] = []
        method = trainer.method
        original = method.set_progress

        def set_progress(epoch: float) -> None:
            seen.append(epoch)
            original(epoch)

        method.set_progress = set_progress
        return seen

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3
            return control

    settings = dict(num_train_epochs=2, save_strategy="steps", save_steps=3, dkd_warmup_epochs=2.0)
    full = build(tmp_path / "full", "dkd", **settings)
    seen_full = record(full)
    full.train()
    # 24 images, batch 8: 3 steps per epoch; the epoch advances once per optimizer step.
    assert seen_full == pytest.approx([0, 1 / 3, 2 / 3, 1, 4 / 3, 5 / 3])
    assert float(full.method.warmup_factor) == pytest.approx(5 / 6)

    part = build(tmp_path / "part", "dkd", **settings)
    part.add_callback(StopAt3())
    part.train()
    # DKD has no state of its own to save: the warm-up is derived from the trainer state.
    assert not os.path.exists(os.path.join(part.args.output_dir, "checkpoint-3", "distill_state.safetensors"))
    resumed = build(tmp_path / "part", "dkd", **settings)
    seen_resumed = record(resumed)
    resumed.train(resume_from_checkpoint=True)
    assert seen_resumed == pytest.approx(seen_full[3:])
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, full.model.state_dict()[key], rtol=0, atol=0, msg=key)


def test_fitnet_checkpoint_keeps_the_connectors_and_the_export_drops_them(tmp_path):
    trainer = build(tmp_path, "fitnet", "vit", max_steps=1, save_strategy="steps", save_steps=1, fitnet_stages=[2, 4])
    before = {k: v.clone() for k, v in trainer.method.connectors.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all({"loss_ce", "loss_kd", "loss_hint"} <= set(h) for h in logs)
    ckpt = os.path.join(trainer.args.output_dir, "checkpoint-1")
    state = load_file(os.path.join(ckpt, "distill_state.safetensors"))
    assert set(state) == set(trainer.method.state_dict()) == {f"connectors.{k}" for k in before}
    assert {k.split(".")[1] for k in state} == {"s2_t2", "s4_t4"}
    manifest = json.load(open(os.path.join(ckpt, "distill_manifest.json")))
    assert manifest["method"]["fitnet_stages"] == [2, 4] and manifest["method"]["fitnet_teacher_stages"] == [2, 4]

    export = tmp_path / "export"
    trainer.save_model(str(export))
    exported = load_file(os.path.join(export, "model.safetensors"))
    assert set(exported) == set(trainer.student.state_dict())
    assert not any("connectors" in k for k in exported)
    assert not os.path.exists(os.path.join(export, "distill_state.safetensors"))

    fresh = build(tmp_path, "fitnet", "vit", max_steps=1, fitnet_stages=[2, 4])
    fresh._load_from_checkpoint(ckpt)
    for k, v in fresh.method.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert any(not torch.equal(before[k], state[f"connectors.{k}"]) for k in before)  # trained, then restored
    metrics = fresh.evaluate()
    assert "eval_accuracy" in metrics and not any("hint" in k for k in metrics)


# ---- model cards and recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,key",
    [("dkd", "zhao2022dkd"), ("dist", "huang2022dist"), ("fitnet", "romero2015"), ("rsd", "zhang2025rsd")],
)
def test_model_card_cites_and_tags_the_method(method, key):
    assert any(key in c for c in CITATIONS[method])
    card = build_model_card(
        ModelCardInfo(model_name="s", student_architecture="resnet18", method_settings={"method": method})
    )
    assert {"knowledge-distillation", method} <= set(card.data.tags)
    assert key in card.text and "lin2025pat" in card.text


def load_script():
    path = os.path.join(ROOT, "examples", "run_image_classification_pat.py")
    spec = importlib.util.spec_from_file_location("run_image_classification_pat", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


RECIPES = sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "*.yaml")))


def test_the_baseline_recipes_exist():
    names = {os.path.basename(p) for p in RECIPES}
    assert "cifar100_swin_t_to_resnet18_dkd.yaml" in names and "cifar100_swin_t_to_resnet18_dist.yaml" in names
    pairs = ("swin_t_to_resnet18", "vit_s_to_mobilenetv2", "convnext_t_to_deit_t", "convnext_t_to_resmlp_s12")
    assert {f"cifar100_{pair}_fitnet.yaml" for pair in pairs} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_every_recipe_parses_with_the_example_script(tmp_path, path):
    """Each YAML goes through the script's own parser (bf16 switched off: this machine has no GPU)."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    values["bf16"] = False
    copy = tmp_path / os.path.basename(path)
    copy.write_text(yaml.safe_dump(values))
    _, _, args = load_script().parse_args([str(copy)])
    assert args.distill_method == values["distill_method"]
    if args.distill_method == "fitnet":
        assert args.fitnet_stages == [1, 2, 3, 4] and args.temperature == 1.0
    if args.distill_method == "dkd":
        assert (args.dkd_alpha, args.dkd_beta, args.dkd_warmup_epochs, args.temperature) == (1.0, 2.0, 0.0, 1.0)
