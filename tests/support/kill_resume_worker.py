"""Child process for test_kill_resume.py: trains a tiny distillation run, optionally dying with SIGKILL.

    python kill_resume_worker.py OUTPUT_DIR METHOD MODE [VARIANT]
    MODE: full | kill-after-step-5 | kill-while-saving-6 | resume
    VARIANT: plain (default) | augment-w0 | augment-w2

24 images, batch 8: 3 steps per epoch. plain: the default augmentation, a checkpoint every epoch. augment-wN:
RandAugment, random erasing, Mixup / CutMix, a checkpoint every 2 steps (checkpoint-4 is mid-epoch) and N
data-loader workers; per-sample seeded augmentation makes the pixels independent of the worker count and of the
resume point.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import torch
from transformers import TrainerCallback

from pat_hf import PATDistillationTrainer
from pat_hf.data.datasets import with_image_transforms
from pat_hf.data.views import ImageView
from pat_hf.models.student import create_student
from pat_hf.models.teacher import load_teacher
from support.tiny import make_image_dataset, tiny_args, tiny_teacher


class KillAfterStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DiesWhileSaving(PATDistillationTrainer):
    """Dies half-way through writing checkpoint 6: its weights are on disk, its optimizer and states are not."""

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if output_dir is not None and os.path.basename(output_dir) == "checkpoint-6":
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    output_dir, method, mode = sys.argv[1:4]
    variant = sys.argv[4] if len(sys.argv) > 4 else "plain"
    torch.set_num_threads(1)
    dataset = make_image_dataset(n=24, size=16)
    torch.manual_seed(0)
    teacher = tiny_teacher("vit")
    student = create_student("test_vit", num_classes=3, img_size=16)
    augment = variant.startswith("augment")
    options = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.5, "re_mode": "pixel"} if augment else {}
    train = with_image_transforms(
        dataset, ImageView.from_timm(student), load_teacher(teacher).view, train=True, **options
    )
    recipe = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "dataloader_num_workers": int(variant[-1])} if augment else {}
    args = tiny_args(
        Path(output_dir).parent,
        output_dir=output_dir,
        distill_method=method,
        max_steps=9,
        save_strategy="steps",
        save_steps=2 if augment else 3,
        per_device_train_batch_size=8,
        **recipe,
    )
    cls = DiesWhileSaving if mode == "kill-while-saving-6" else PATDistillationTrainer
    trainer = cls(model=student, teacher=teacher, args=args, train_dataset=train)
    if mode == "kill-after-step-5":
        trainer.add_callback(KillAfterStep(5))
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    trainer.save_model(os.path.join(output_dir, "final"))
    torch.save([f for f in getattr(trainer.method, "feedback", [])], os.path.join(output_dir, "final", "feedback.pt"))
    print("global_step", trainer.state.global_step)


if __name__ == "__main__":
    main()
