import math

import pytest
import torch

from pat_hf.losses import cross_entropy, kl_div_loss


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
