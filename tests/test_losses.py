import math

import pytest
import torch

from pat_hf.losses import cross_entropy, hcl_loss, kl_div_loss, ofa_loss


def test_kl_div_loss_zero_for_identical_logits():
    z = torch.randn(4, 7)
    assert kl_div_loss(z, z.clone(), temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_div_loss_matches_hand_computed_value():
    student = torch.tensor([[0.0, math.log(3.0)]])  # p_s = (1/4, 3/4)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
    assert kl_div_loss(student, teacher, temperature=1.0).item() == pytest.approx(expected, rel=1e-5)


def test_kl_div_loss_temperature_scaling_and_batchmean():
    s = torch.tensor([[2.0, 0.0, -2.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, -1.0]])
    T = 4.0
    p_t = torch.softmax(t / T, -1)
    log_p_s = torch.log_softmax(s / T, -1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * T**2
    assert kl_div_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-6)
    # batchmean: duplicating the batch leaves the value unchanged
    assert kl_div_loss(torch.cat([s, s]), torch.cat([t, t]), T).item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_div_loss_gradient_pulls_student_towards_teacher():
    s = torch.zeros(1, 2, requires_grad=True)
    t = torch.tensor([[2.0, 0.0]])
    kl_div_loss(s, t, 1.0).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]
    # d/ds KL = (p_s - p_t) / T * T^2 for batch 1
    p_t = torch.softmax(t, -1)
    assert torch.allclose(s.grad, torch.tensor([[0.5, 0.5]]) - p_t, atol=1e-6)


def test_kl_div_loss_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kl_div_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


def test_cross_entropy_with_label_smoothing_hand_computed():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    labels = torch.tensor([0])
    assert cross_entropy(logits, labels).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    eps = 0.1  # target = (1 - eps + eps/2, eps/2)
    expected = -(0.95 * math.log(0.75) + 0.05 * math.log(0.25))
    assert cross_entropy(logits, labels, eps).item() == pytest.approx(expected, rel=1e-6)


def test_ofa_loss_with_epsilon_one_is_soft_label_cross_entropy():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    p_t = torch.softmax(t, -1)
    soft_ce = -(p_t * torch.log_softmax(s, -1)).sum(-1).mean()
    assert ofa_loss(s, t, labels, epsilon=1.0).item() == pytest.approx(soft_ce.item(), rel=1e-6)
    assert ofa_loss(s, t, None, epsilon=1.0).item() == pytest.approx(soft_ce.item(), rel=1e-6)


def test_ofa_loss_hand_computed_with_epsilon():
    s = torch.tensor([[0.0, 0.0]])  # log p_s = log 1/2 each
    t = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (3/4, 1/4)
    labels = torch.tensor([0])
    eps = 1.5
    target = [(0.75 + 1) ** eps - 1, 0.25**eps]
    expected = -(target[0] + target[1]) * math.log(0.5)
    assert ofa_loss(s, t, labels, epsilon=eps).item() == pytest.approx(expected, rel=1e-6)


def test_ofa_loss_takes_no_gradient_through_the_teacher():
    s = torch.randn(2, 3, requires_grad=True)
    t = torch.randn(2, 3, requires_grad=True)
    ofa_loss(s, t, torch.tensor([0, 1]), epsilon=1.5).backward()
    assert s.grad is not None and t.grad is None


def test_hcl_loss_hand_computed():
    a = torch.zeros(1, 1, 8, 8)
    f = torch.zeros(1, 1, 8, 8)
    f[..., :4, :4] = 1.0  # a quarter of the map
    full = 0.25  # mean squared error over the map
    pool4 = 0.25  # 4x4 pooling: the top-left 2x2 cells are 1
    pool2 = 0.25  # 2x2 pooling: one cell is 1
    pool1 = 0.25**2  # global pooling: 0.25
    expected = (full + 0.5 * pool4 + 0.25 * pool2 + 0.125 * pool1) / 1.875
    assert hcl_loss(a, f).item() == pytest.approx(expected, rel=1e-6)


def test_hcl_loss_skips_levels_not_smaller_than_the_map():
    a = torch.zeros(1, 1, 4, 4)
    f = torch.ones(1, 1, 4, 4)
    # 4x4 map: the 4x4 level is skipped, 2x2 and 1x1 get 0.5 and 0.25 (ReviewKD), all MSEs equal 1.
    assert hcl_loss(a, f).item() == pytest.approx(1.0, rel=1e-6)
    f2 = torch.zeros(1, 1, 4, 4)
    f2[..., 0, 0] = 4.0
    expected = (16 / 16 + 0.5 * (1.0**2) / 4 + 0.25 * (0.25**2)) / 1.75
    assert hcl_loss(a, f2).item() == pytest.approx(expected, rel=1e-6)
    one = hcl_loss(torch.zeros(2, 3, 1, 1), torch.ones(2, 3, 1, 1))
    assert one.item() == pytest.approx(1.0)


def test_hcl_loss_gradients_reach_both_sides_and_shapes_must_match():
    a = torch.randn(2, 3, 6, 6, requires_grad=True)
    f = torch.randn(2, 3, 6, 6, requires_grad=True)
    hcl_loss(a, f).backward()
    assert a.grad.abs().sum() > 0 and f.grad.abs().sum() > 0
    torch.testing.assert_close(a.grad, -f.grad)
    with pytest.raises(ValueError, match="equal shapes"):
        hcl_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2))
