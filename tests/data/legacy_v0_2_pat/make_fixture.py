"""Run from the repository root with pat_hf 0.2.0 (commit b750465): writes tests/data/legacy_v0_2_pat with pat_hf 0.2.0: checkpoint-4 of an 8-step PAT run and the final student."""

import os
import shutil
import sys
from pathlib import Path

import datasets
import torch
from safetensors.torch import save_file

sys.path.insert(0, "tests")
from pat_hf import PATDistillationTrainer, create_student
from support.tiny import tiny_args

OUT = sys.argv[1]
LEGACY_TEACHER = "tests/data/legacy_v0_1_ofa/teacher"


def data():
    g = torch.Generator().manual_seed(0)
    n = 16
    labels = torch.arange(n) % 3
    x = torch.randn(n, 3, 32, 32, generator=g) + labels.view(-1, 1, 1, 1).float()
    xt = torch.randn(n, 3, 32, 32, generator=g) + labels.view(-1, 1, 1, 1).float()
    ds = datasets.Dataset.from_dict(
        {"pixel_values": x.numpy(), "teacher_pixel_values": xt.numpy(), "labels": labels.numpy()}
    )
    return ds.with_format("torch")


def run(output_dir, max_steps, resume=False):
    torch.manual_seed(0)
    student = create_student("resnet10t", num_classes=3, stem_width=8, channels=(8, 16, 32, 64))
    args = tiny_args(
        Path("/tmp"),
        output_dir=output_dir,
        distill_method="pat",
        pat_dim=32,
        pat_num_queries=16,
        pat_num_heads=2,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=4,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
    )
    trainer = PATDistillationTrainer(model=student, teacher=LEGACY_TEACHER, args=args, train_dataset=data())
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


if __name__ == "__main__":
    tmp = "/tmp/v02run"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer = run(tmp, 8)
    os.makedirs(OUT, exist_ok=True)
    shutil.copytree(os.path.join(tmp, "checkpoint-4"), os.path.join(OUT, "checkpoint-4"), dirs_exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in trainer.student.state_dict().items()},
        os.path.join(OUT, "final_student_v0_2.safetensors"),
    )
    print(os.listdir(os.path.join(OUT, "checkpoint-4")))
