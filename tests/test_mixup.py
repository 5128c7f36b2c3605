"""Mixup / CutMix with timm's Mixup, the same mix on the student's (16 px) and the teacher's (32 px) batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.data.mixup import PairedMixup
from pat_hf.losses import cross_entropy, ofa_loss
from pat_hf.models.teacher import load_teacher
from support.tiny import make_image_dataset, tiny_args, tiny_teacher

K = 5
MODES = ["batch", "pair", "elem"]
KINDS = {
    "mixup": {"mixup_alpha": 0.8},
    "cutmix": {"cutmix_alpha": 1.0},
    "both": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0},
}


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, 3, 16, 16, generator=g)
    teacher = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, K, (n,), generator=g)
    return student, teacher, labels


def expected_view(x: torch.Tensor, lam: np.ndarray, boxes, scale: int) -> torch.Tensor:
    """Each sample i mixed with its partner n-1-i by hand: blended with λ_i, or the partner's box pasted in."""
    n, out = len(x), x.clone()
    for i in range(n):
        j = n - 1 - i
        if boxes[i] is not None:
            yl, yh, xl, xh = (v * scale for v in boxes[i])
            out[i][:, yl:yh, xl:xh] = x[j][:, yl:yh, xl:xh]
        elif lam[i] != 1:
            out[i] = x[i] * float(lam[i]) + x[j] * (1 - float(lam[i]))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_view_is_the_mix_of_its_unmixed_views(mode, kind):
    mixup = PairedMixup(mode=mode, label_smoothing=0.1, num_classes=K, **KINDS[kind])
    for seed in range(4):
        np.random.seed(seed)
        student, teacher, labels = batch(seed=seed)
        s_mixed, t_mixed, targets = mixup(student, teacher, labels)
        info = mixup.last_mix
        assert info.size == (16, 16)
        # Exact: the same arithmetic on each view's own pixels, the box scaled x2 for the teacher.
        assert torch.equal(s_mixed, expected_view(student, info.lam, info.boxes, 1))
        assert torch.equal(t_mixed, expected_view(teacher, info.lam, info.boxes, 2))
        # λ of a CutMix sample is the share of its own pixels on the student's view (timm's correction), and the
        # teacher's box covers the same share of its view.
        for i, box in enumerate(info.boxes):
            if box is not None:
                yl, yh, xl, xh = box
                assert info.lam[i] == pytest.approx(1 - (yh - yl) * (xh - xl) / 256)
                own_t = (t_mixed[i] == teacher[i]).all(0).float().mean().item()
                assert own_t == pytest.approx(info.lam[i], abs=1e-6) or info.lam[i] == 1
        # Targets: timm's, smoothed once, mixed with the partner's.
        lam_t = torch.tensor(info.lam, dtype=torch.float32).unsqueeze(1)
        torch.testing.assert_close(targets, mixup_target(labels, K, lam_t, 0.1))
        assert torch.allclose(targets.sum(1), torch.ones(8))
        # The inputs are untouched.
        assert torch.equal(student, batch(seed=seed)[0])


def test_pair_mode_shares_lambda_and_box_within_a_pair():
    mixup = PairedMixup(mixup_alpha=0.8, cutmix_alpha=1.0, mode="pair", num_classes=K)
    np.random.seed(1)
    mixup(*batch())
    info = mixup.last_mix
    for i in range(4):
        assert info.lam[i] == info.lam[7 - i] and info.boxes[i] == info.boxes[7 - i]


def test_batch_mode_draws_one_lambda_and_box_and_follows_numpy():
    mixup = PairedMixup(cutmix_alpha=1.0, mode="batch", num_classes=K)
    np.random.seed(5)
    a = mixup(*batch())
    info = mixup.last_mix
    assert len(set(info.lam.tolist())) == 1 and len(set(info.boxes)) == 1
    np.random.seed(5)
    b = mixup(*batch())
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # numpy's RNG decides everything (resume restores it)


def test_odd_batch_leaves_the_last_sample_unmixed():
    mixup = PairedMixup(mixup_alpha=1.0, mode="pair", label_smoothing=0.1, num_classes=K)
    np.random.seed(0)
    student, teacher, labels = batch(n=7)
    s, t, targets = mixup(student, teacher, labels)
    assert torch.equal(s[6], student[6]) and torch.equal(t[6], teacher[6])
    assert mixup.last_mix.lam[6] == 1
    torch.testing.assert_close(targets[6], mixup_target(labels[6:], K, 1.0, 0.1)[0])


def test_without_teacher_or_labels():
    mixup = PairedMixup(mixup_alpha=1.0, num_classes=K)
    student, _, _ = batch()
    s, t, targets = mixup(student)
    assert t is None and targets is None and s.shape == student.shape


def test_soft_target_cross_entropy_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.1, 0.1, 0.8]])
    log_p = [
        [2 - math.log(math.e**2 + 1 + math.e**-1), -math.log(math.e**2 + 1 + math.e**-1)],
        [0.5 - math.log(2 * math.e**0.5 + math.e), 1 - math.log(2 * math.e**0.5 + math.e)],
    ]
    expected = -(0.7 * log_p[0][0] + 0.3 * log_p[0][1] + 0.2 * log_p[1][0] + 0.8 * log_p[1][1]) / 2
    assert cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    # Smoothing applies to class indices only: soft targets are not smoothed a second time.
    assert cross_entropy(logits, targets, 0.1).item() == pytest.approx(expected, rel=1e-6)
    one_hot = F.one_hot(torch.tensor([0, 2]), 3).float()
    smoothed = one_hot * 0.9 + 0.1 / 3
    assert cross_entropy(logits, smoothed).item() == pytest.approx(
        cross_entropy(logits, torch.tensor([0, 2]), 0.1).item(), rel=1e-6
    )


def test_ofa_loss_takes_the_argmax_class_of_soft_targets():
    s, t = torch.randn(4, K), torch.randn(4, K)
    labels = torch.tensor([0, 3, 1, 4])
    soft = mixup_target(labels, K, 0.7, 0.1)  # the own class keeps the largest share
    assert ofa_loss(s, t, soft, epsilon=1.5).item() == pytest.approx(ofa_loss(s, t, labels, 1.5).item(), rel=1e-6)


def test_the_trainer_mixes_training_batches_only(tmp_path):
    """The method gets the mixed views and soft targets during training; evaluation sees plain labels."""
    dataset = make_image_dataset(n=16)
    teacher = tiny_teacher("vit")
    student = create_student("test_resnet", num_classes=3, img_size=20)
    view = ImageView.from_timm(student)
    args = tiny_args(tmp_path, distill_method="kd", mixup_alpha=0.8, cutmix_alpha=1.0, max_steps=2, label_smoothing=0.1)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=with_image_transforms(dataset, view, load_teacher(teacher).view, train=True),
        eval_dataset=with_image_transforms(dataset, view, None, train=False),
    )
    assert trainer.mixup is not None and trainer.mixup.label_smoothing == 0.1 and trainer.mixup.num_classes == 3
    seen = []
    original = trainer.method.forward, trainer.method.evaluate

    def record(kind, fn):
        def wrapped(student, teacher, batch):
            seen.append((kind, batch.labels.dtype, tuple(batch.labels.shape)))
            return fn(student, teacher, batch)

        return wrapped

    trainer.method.forward = record("train", original[0])
    trainer.method.evaluate = record("eval", original[1])
    trainer.train()
    trainer.evaluate()
    assert [s for s in seen if s[0] == "train"] == [("train", torch.float32, (8, 3))] * 2
    assert {s[1] for s in seen if s[0] == "eval"} == {torch.int64}


def test_tensor_batch_collator_with_mixup_and_ema(tmp_path):
    """The pieces work with a tensor collator (no teacher view in the batch: the wrapper derives it from the mixed
    student view) and an EMA callback added by hand."""
    from pat_hf import ModelEmaCallback
    from pat_hf.data.datasets import TensorBatchCollator

    g = torch.Generator().manual_seed(0)
    items = [
        {"image": torch.randint(0, 255, (28, 28), dtype=torch.uint8, generator=g), "labels": i % 3, "augment": True}
        for i in range(8)
    ]
    student = create_student("test_resnet", num_classes=3, img_size=32)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher("vit"),
        args=tiny_args(
            tmp_path, distill_method="kd", mixup_alpha=0.8, cutmix_alpha=1.0, max_steps=2, per_device_train_batch_size=4
        ),
        train_dataset=items,
        data_collator=TensorBatchCollator(),
        class_names=["a", "b", "c"],
        callbacks=[ModelEmaCallback(decay=0.9)],
    )
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.model_ema.module is not None
