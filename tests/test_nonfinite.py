"""A NaN or infinite loss stops training with the component named, before that step's update."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback

from pat_hf import PATDistillationTrainer
from pat_hf.data.datasets import with_image_transforms
from pat_hf.data.views import ImageView
from pat_hf.models.student import create_student
from pat_hf.models.teacher import load_teacher
from pat_hf.training.trainer import NonFiniteLossError
from support.tiny import make_image_dataset, tiny_args, tiny_teacher


class PoisonTeacherAt(TrainerCallback):
    """From the given step on, the teacher's classifier outputs NaN (as a diverged or broken teacher would)."""

    def __init__(self, teacher: torch.nn.Module, step: int) -> None:
        self.teacher, self.step = teacher, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.teacher.classifier.bias.fill_(float("nan"))


def build(tmp_path, **overrides):
    dataset = make_image_dataset(n=16, size=16)
    torch.manual_seed(0)
    teacher = tiny_teacher("vit")
    student = create_student("test_vit", num_classes=3, img_size=16)
    train = with_image_transforms(dataset, ImageView.from_timm(student), load_teacher(teacher).view, train=True)
    args = tiny_args(tmp_path, distill_method="kd", max_steps=4, save_strategy="steps", save_steps=2, **overrides)
    trainer = PATDistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=train)
    trainer.add_callback(PoisonTeacherAt(teacher, 2))
    return trainer


def test_nan_teacher_stops_training_naming_the_component(tmp_path):
    trainer = build(tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"(?s)step 3 .*loss_kd=nan.*loss=nan.*checkpoints already written"):
        trainer.train()
    # The step that saw NaN made no update, and the checkpoint before it is complete and finite.
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
    # The run marker, the checkpoint before the bad step, and nothing else (the lock is released).
    assert sorted(os.listdir(trainer.args.output_dir)) == ["checkpoint-2", "pat_hf_run.json"]
    from safetensors.torch import load_file

    saved = load_file(os.path.join(trainer.args.output_dir, "checkpoint-2", "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert trainer.state.global_step == 2 and trainer.state.log_history[-1]["step"] == 2  # nothing from step 3


def test_check_can_be_switched_off(tmp_path):
    trainer = build(tmp_path, stop_on_nonfinite_loss=False)
    trainer.train()
    assert trainer.state.global_step == 4
    assert not all(torch.isfinite(p).all() for p in trainer.student.parameters())
