"""Model EMA of the student (timm's ModelEmaV3) as a callback: updates, evaluation, checkpoints, exact resume, export."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.models.teacher import load_teacher
from pat_hf.training.ema import EMA_WEIGHTS_NAME, ModelEmaCallback
from support.tiny import make_image_dataset, tiny_args, tiny_teacher

# The whole recipe on: timm augmentation, Mixup + CutMix, a per-epoch timm cosine with warm-up, EMA.
AUGMENT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5, "train_interpolation": "random"}
RECIPE = {
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "lr_schedule": "cosine",
    "warmup_epochs": 1,
    "warmup_lr": 1e-4,
    "min_lr": 1e-4,
    "model_ema": True,
    "model_ema_decay": 0.7,
}


def build(tmp_path, callbacks=None, augment=None, dataset=None, **overrides) -> PATDistillationTrainer:
    torch.manual_seed(0)
    student = create_student("test_vit", num_classes=3, img_size=16)
    teacher = tiny_teacher("vit")
    dataset = dataset if dataset is not None else make_image_dataset(n=24, size=16)
    view = ImageView.from_timm(student)
    defaults = {"distill_method": "kd", "per_device_train_batch_size": 8, "optim": "sgd", "learning_rate": 0.1}
    return PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=tiny_args(tmp_path, **{**defaults, **overrides}),
        train_dataset=with_image_transforms(dataset, view, load_teacher(teacher).view, train=True, **(augment or {})),
        eval_dataset=with_image_transforms(make_image_dataset(n=9, size=16, seed=1), view, None, train=False),
        callbacks=callbacks,
    )


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Record(TrainerCallback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state_, control, model=None, **kwargs):
        self.weights.append(state(model.student))


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state_, control, **kwargs):
        if state_.global_step == self.step:
            control.should_training_stop = True


def test_ema_tracks_the_student_after_each_optimizer_step(tmp_path):
    record = Record()
    trainer = build(tmp_path, callbacks=[record], max_steps=3, model_ema=True, model_ema_decay=0.5)
    initial = state(trainer.student)
    trainer.train()
    ema = trainer.model_ema
    assert type(ema.ema).__name__ == "ModelEmaV3"
    assert set(ema.state_dict()) == set(trainer.student.state_dict())  # the student only, no head or teacher
    expected = initial
    for weights in record.weights:  # a constant decay from the initial weights, as the official code
        expected = {k: 0.5 * expected[k] + 0.5 * weights[k] for k in expected}
    for key, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert not {id(p) for p in ema.module.parameters()} & {
        id(p) for g in trainer.optimizer.param_groups for p in g["params"]
    }


def test_ema_is_evaluated_beside_the_student(tmp_path):
    trainer = build(tmp_path, max_steps=2, model_ema=True, model_ema_decay=0.0, eval_strategy="steps", eval_steps=1)
    trainer.train()
    metrics = trainer.evaluate()
    for name in ("accuracy", "loss", "loss_ce", "loss_kd"):
        assert f"eval_ema_{name}" in metrics, name
    # decay 0: the EMA is the student, so both evaluations agree.
    assert metrics["eval_ema_accuracy"] == metrics["eval_accuracy"]
    assert metrics["eval_ema_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert metrics["eval_ema_loss_kd"] == pytest.approx(metrics["eval_loss_kd"], abs=2e-4)
    logged = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(logged) == 3 and all("eval_ema_accuracy" in h and "eval_ema_loss_ce" in h for h in logged)
    assert trainer.student is trainer.model.student  # swapped back


def test_a_callback_added_by_hand_works_without_the_argument(tmp_path):
    trainer = build(tmp_path, callbacks=[ModelEmaCallback(decay=0.9)], max_steps=1)
    trainer.train()
    assert "eval_ema_accuracy" in trainer.evaluate()


def test_checkpoints_hold_the_ema_and_resume_refuses_one_without(tmp_path):
    trainer = build(tmp_path, max_steps=3, save_strategy="steps", save_steps=3, model_ema=True)
    trainer.train()
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-3")
    saved = load_file(os.path.join(checkpoint, EMA_WEIGHTS_NAME))
    assert saved.keys() == trainer.model_ema.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in trainer.model_ema.state_dict().items())
    with open(os.path.join(checkpoint, "distill_manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["ema"] == {
        "decay": 0.9998,
        "warmup": False,
        "implementation": "ModelEmaV3",
        "file": EMA_WEIGHTS_NAME,
    }

    plain = build(tmp_path / "plain", max_steps=3, save_strategy="steps", save_steps=3)
    plain.train()
    plain_checkpoint = os.path.join(plain.args.output_dir, "checkpoint-3")
    with_ema = build(tmp_path / "plain", max_steps=6, model_ema=True)
    with pytest.raises(ValueError, match="has no model EMA"):
        with_ema.train(resume_from_checkpoint=plain_checkpoint)
    # A manifest that claims an EMA whose file is gone.
    os.remove(os.path.join(checkpoint, EMA_WEIGHTS_NAME))
    again = build(tmp_path, max_steps=6, model_ema=True)
    with pytest.raises(ValueError, match=EMA_WEIGHTS_NAME):
        again.train(resume_from_checkpoint=checkpoint)


def test_interrupted_at_epoch_end_and_resumed_run_ends_bit_identical(tmp_path):
    """1 process, CPU, the full recipe (timm augmentation, Mixup/CutMix on numpy's RNG, timm cosine per epoch,
    EMA): stopped after epoch 1 (checkpoint-3) and resumed, the raw student and its EMA end bit-identical to an
    uninterrupted run's."""
    common = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3, **RECIPE}
    full = build(tmp_path / "full", augment=AUGMENT, **common)
    full.train()

    first = build(tmp_path / "split", augment=AUGMENT, callbacks=[StopAt(3)], **common)
    first.train()
    assert first.state.global_step == 3
    resumed = build(tmp_path / "split", augment=AUGMENT, **common)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6

    for name, a, b in (
        ("raw", state(full.student), state(resumed.student)),
        ("ema", full.model_ema.state_dict(), resumed.model_ema.state_dict()),
    ):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    # The EMA did move away from the raw weights (decay 0.7 over 6 steps).
    assert not torch.equal(full.model_ema.state_dict()["head.weight"], full.student.state_dict()["head.weight"])
    logs = [[h["learning_rate"] for h in t.state.log_history if "learning_rate" in h] for t in (full, resumed)]
    assert logs[0][3:] == logs[1][-3:]


@pytest.mark.parametrize("choice", ["auto", "ema", "raw"])
def test_export_weights_and_the_model_card(tmp_path, choice):
    trainer = build(tmp_path, max_steps=3, model_ema=True, model_ema_decay=0.7, export_weights=choice)
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    exported = load_file(os.path.join(out, "model.safetensors"))
    source = trainer.student.state_dict() if choice == "raw" else trainer.model_ema.state_dict()
    assert all(torch.equal(exported[k], v.cpu()) for k, v in source.items())
    card = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    expected = "the raw (non-averaged) student" if choice == "raw" else "the model EMA of the student"
    assert f"exported weights: {expected}" in card
    assert "model EMA: decay 0.7 (ModelEmaV3)" in card


def test_load_best_model_at_end_restores_the_best_checkpoint_raw_and_ema(tmp_path):
    trainer = build(
        tmp_path,
        max_steps=3,
        model_ema=True,
        model_ema_decay=0.5,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="ema_loss",
        greater_is_better=False,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    losses = {h["step"]: h["eval_ema_loss"] for h in trainer.state.log_history if "eval_ema_loss" in h}
    assert os.path.basename(best) == f"checkpoint-{min(losses, key=losses.get)}"
    ema_saved = load_file(os.path.join(best, EMA_WEIGHTS_NAME))
    raw_saved = load_file(os.path.join(best, "model.safetensors"))
    assert all(torch.equal(ema_saved[k], v) for k, v in trainer.model_ema.state_dict().items())
    assert all(torch.equal(raw_saved[k], v) for k, v in trainer.student.state_dict().items())
