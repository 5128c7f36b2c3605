"""timm's learning-rate schedules on Trainer (pat_hf.training.schedules) and the optimizer's weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler

from pat_hf import ImageView, PATDistillationTrainer, PATTrainingArguments, create_student, with_image_transforms
from pat_hf.models.teacher import load_teacher
from pat_hf.training.schedules import build_timm_lr_scheduler
from support.tiny import make_image_dataset, tiny_args, tiny_teacher


def optimizer(lr: float = 0.1, groups: int = 2) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)]} for _ in range(groups)], lr=lr)


def lrs_per_step(scheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def timm_reference(cls, steps_per_epoch: int, epochs: int, **kwargs) -> list[float]:
    """timm's own loop: the rate of epoch e is set by step(e) (at construction for e = 0), constant in the epoch."""
    opt = optimizer()
    scheduler = cls(opt, **kwargs)
    out = []
    for epoch in range(epochs):
        scheduler.step(epoch)
        out += [opt.param_groups[0]["lr"]] * steps_per_epoch
    return out


def test_cosine_with_per_epoch_warmup_matches_timm():
    """CIFAR recipe shape: 3 warm-up epochs from warmup_lr, cosine to min_lr, the rate constant within an epoch."""
    scheduler = build_timm_lr_scheduler(
        optimizer(), "cosine", num_training_steps=40, steps_per_epoch=4, warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-3
    )
    got = lrs_per_step(scheduler, 40)
    want = timm_reference(
        CosineLRScheduler, 4, 10, t_initial=10, lr_min=1e-3, warmup_t=3, warmup_lr_init=1e-4, cycle_limit=1
    )
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] == pytest.approx(1e-4) and got[4] == pytest.approx(1e-4 + (0.1 - 1e-4) / 3)
    assert len(set(got[12:16])) == 1 and got[12] > got[16]  # per epoch
    # The cosine reaches min_lr at the end of training: 0.5 (1 + cos(pi 9/10)) of the way in the last epoch.
    assert got[-1] == pytest.approx(1e-3 + 0.5 * (0.1 - 1e-3) * (1 + math.cos(math.pi * 9 / 10)))


def test_step_decay_every_thirty_epochs():
    """ImageNet CNN recipe: x0.1 every 30 epochs after 3 warm-up epochs."""
    scheduler = build_timm_lr_scheduler(
        optimizer(), "step", num_training_steps=100, steps_per_epoch=1, warmup_epochs=3, warmup_lr=1e-4
    )
    got = lrs_per_step(scheduler, 100)
    # As timm 0.6 (the official code's): the warm-up overlays the first epochs, the decays fall on epochs 30, 60, 90.
    want = timm_reference(
        StepLRScheduler, 1, 100, decay_t=30, decay_rate=0.1, warmup_t=3, warmup_lr_init=1e-4, warmup_prefix=False
    )
    assert got == pytest.approx(want, rel=1e-12)
    assert got[3] == pytest.approx(0.1) and got[29] == pytest.approx(0.1)
    assert got[30] == pytest.approx(0.01) and got[60] == pytest.approx(0.001) and got[99] == pytest.approx(1e-4)


def test_per_step_schedule_and_state_dict_resume():
    scheduler = build_timm_lr_scheduler(
        optimizer(), "cosine", num_training_steps=20, steps_per_epoch=4, warmup_epochs=1, on_epochs=False
    )
    got = lrs_per_step(scheduler, 20)
    assert len(set(got[:4])) == 4  # warm-up changes every step
    # Resuming: a fresh scheduler loaded with the state after 7 steps continues identically.
    first = build_timm_lr_scheduler(
        optimizer(), "cosine", num_training_steps=20, steps_per_epoch=4, warmup_epochs=1, on_epochs=False
    )
    lrs_per_step(first, 7)
    second = build_timm_lr_scheduler(
        optimizer(), "cosine", num_training_steps=20, steps_per_epoch=4, warmup_epochs=1, on_epochs=False
    )
    second.load_state_dict(first.state_dict())
    second.optimizer.param_groups[0]["lr"] = second.get_last_lr()[0]
    assert lrs_per_step(second, 13)[1:] == pytest.approx(got[8:])


def test_trainer_uses_the_timm_schedule_per_epoch(tmp_path):
    """24 images, batch 8: 3 steps per epoch; the logged rate follows timm's per-epoch warm-up and cosine."""
    student = create_student("test_vit", num_classes=3, img_size=16)
    teacher = tiny_teacher("vit")
    dataset = make_image_dataset(n=24, size=16)
    args = tiny_args(
        tmp_path,
        distill_method="kd",
        num_train_epochs=4,
        learning_rate=0.1,
        lr_schedule="cosine",
        warmup_epochs=1,
        warmup_lr=0.01,
        min_lr=0.001,
    )
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=with_image_transforms(
            dataset, ImageView.from_timm(student), load_teacher(teacher).view, train=True
        ),
    )
    trainer.train()
    logged = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    want = timm_reference(CosineLRScheduler, 3, 4, t_initial=4, lr_min=0.001, warmup_t=1, warmup_lr_init=0.01)
    assert logged == pytest.approx(want, rel=1e-9)


def test_lr_schedule_refuses_step_warmup(tmp_path):
    with pytest.raises(ValueError, match="warmup_epochs"):
        tiny_args(tmp_path, lr_schedule="cosine", warmup_steps=0.1)
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny_args(tmp_path, lr_schedule="linear")


@pytest.mark.parametrize("method", ["ofa", "pat"])
def test_no_weight_decay_on_1d_params_of_student_and_heads_nor_no_weight_decay(tmp_path, method):
    """The optimizer gets two groups: decay on every matrix / kernel (student and heads), none on any parameter
    of at most one dimension (biases, norms, PAT's beta) and on the student's no_weight_decay() (pos_embed,
    cls_token)."""
    student = create_student("test_vit", num_classes=3, img_size=16)
    teacher = tiny_teacher("vit")
    extra = {"pat_dim": 16, "pat_num_queries": 16, "pat_num_heads": 2} if method == "pat" else {}
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=tiny_args(tmp_path, distill_method=method, weight_decay=0.05, **extra),
        train_dataset=make_image_dataset(n=8, size=16),
    )
    trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups}
    assert set(groups) == {0.05, 0.0}
    decayed, plain = groups[0.05], groups[0.0]
    every = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert decayed | plain == every and not decayed & plain
    params = dict(trainer.model.named_parameters())
    assert all(params[n].ndim >= 2 for n in decayed)
    assert {n for n in every if params[n].ndim <= 1} <= plain
    assert {"student.pos_embed", "student.cls_token"} <= plain
    assert plain - {n for n in every if params[n].ndim <= 1} == {"student.pos_embed", "student.cls_token"}
    heads = {n for n in every if n.startswith("method.")}
    assert heads & decayed and heads & plain  # the heads' kernels decay, their biases / norms do not
    if method == "pat":
        assert any(n.endswith("beta") for n in plain)


def test_recipe_arguments_are_training_arguments():
    args = PATTrainingArguments("out", lr_schedule="step", decay_epochs=30, model_ema=True, mixup_alpha=0.8)
    assert args.output_dir == "out" and args.lr_schedule == "step" and args.model_ema
    with pytest.raises(ValueError, match="mixup_mode"):
        PATTrainingArguments("out", mixup_alpha=0.8, mixup_mode="row")
    with pytest.raises(ValueError, match="export_weights"):
        PATTrainingArguments("out", export_weights="ema")
