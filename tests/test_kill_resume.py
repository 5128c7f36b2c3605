"""A run killed with SIGKILL resumes from its last complete checkpoint and ends bit-identical (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "kill_resume_worker.py")


def run_worker(output_dir, method: str, mode: str, variant: str = "plain") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run(
        [sys.executable, WORKER, str(output_dir), method, mode, variant],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def final_state(output_dir) -> tuple[dict[str, torch.Tensor], list]:
    return (
        load_file(os.path.join(output_dir, "final", "model.safetensors")),
        torch.load(os.path.join(output_dir, "final", "feedback.pt")),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "kill", "survivor"),
    [("kd", "kill-after-step-5", "checkpoint-3"), ("pat", "kill-while-saving-6", "checkpoint-3")],
)
def test_sigkilled_run_resumes_exactly(tmp_path, method, kill, survivor):
    full = run_worker(tmp_path / "full", method, "full")
    assert full.returncode == 0, full.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    killed = run_worker(killed_dir, method, kill)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    checkpoints = sorted(p for p in os.listdir(killed_dir) if p.startswith("checkpoint-"))
    assert checkpoints[-1] == survivor
    if kill == "kill-while-saving-6":
        # The half-written checkpoint stayed under its temporary name: resume cannot pick it up.
        assert not (killed_dir / "checkpoint-6").exists()
        assert (killed_dir / "_tmp-checkpoint-6" / "checkpoint-6" / "model.safetensors").is_file()
        assert not (killed_dir / "_tmp-checkpoint-6" / "checkpoint-6" / "trainer_state.json").exists()
    for name in checkpoints:  # every checkpoint-N is complete
        files = set(os.listdir(killed_dir / name))
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "distill_manifest.json"} <= files, name

    resumed = run_worker(killed_dir, method, "resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "global_step 9" in resumed.stdout
    assert not any(p.startswith("_tmp-") for p in os.listdir(killed_dir))  # the stale temporary folder is gone

    (expected, expected_fb), (got, got_fb) = final_state(tmp_path / "full"), final_state(killed_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert len(got_fb) == len(expected_fb) == (4 if method == "pat" else 0)
    for a, b in zip(got_fb, expected_fb):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
def test_resumed_mid_epoch_with_augmentation_ends_identical(tmp_path):
    """RandAugment, random erasing and Mixup / CutMix on: a run killed after step 5 resumes from checkpoint-4, in
    the middle of epoch 2, with 2 data-loader workers where the uninterrupted run had none, and ends with the same
    weights, bit for bit: every sample's augmentation is seeded from (seed, epoch, index)."""
    full = run_worker(tmp_path / "full", "kd", "full", "augment-w0")
    assert full.returncode == 0, full.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    killed = run_worker(killed_dir, "kd", "kill-after-step-5", "augment-w0")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    assert sorted(p for p in os.listdir(killed_dir) if p.startswith("checkpoint-"))[-1] == "checkpoint-4"
    resumed = run_worker(killed_dir, "kd", "resume", "augment-w2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "global_step 9" in resumed.stdout
    (expected, _), (got, _) = final_state(tmp_path / "full"), final_state(killed_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    # The augmentation was on, seeded per sample (recorded in the checkpoints' manifest).
    with open(killed_dir / "checkpoint-4" / "distill_manifest.json", encoding="utf-8") as f:
        augmentation = json.load(f)["augmentation"]
    assert augmentation["re_prob"] == 0.5 and augmentation["auto_augment"] and augmentation["per_sample_seed"]


def test_staged_checkpoints_rotate_and_keep_the_best(tmp_path):
    """save_total_limit and load_best_model_at_end see the renamed checkpoint-N folders, never _tmp- ones."""
    from pat_hf import PATDistillationTrainer
    from pat_hf.data.datasets import with_image_transforms
    from pat_hf.data.views import ImageView
    from pat_hf.models.student import create_student
    from pat_hf.models.teacher import load_teacher
    from support.tiny import make_image_dataset, tiny_args, tiny_teacher

    dataset = make_image_dataset(n=16, size=16)
    teacher = tiny_teacher("vit")
    student = create_student("test_vit", num_classes=3, img_size=16)
    view = ImageView.from_timm(student)
    args = tiny_args(
        tmp_path,
        distill_method="kd",
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=with_image_transforms(dataset, view, load_teacher(teacher).view, train=True),
        eval_dataset=with_image_transforms(dataset, view, None, train=False),
    )
    trainer.train()
    names = sorted(os.listdir(args.output_dir))
    assert not any(n.startswith("_") for n in names), names
    checkpoints = [n for n in names if n.startswith("checkpoint-")]
    best = trainer.state.best_model_checkpoint
    assert os.path.basename(best) in checkpoints and os.path.dirname(best) == args.output_dir
    assert "checkpoint-4" in checkpoints and len(checkpoints) <= 3  # the limit, plus the best when older
    with open(os.path.join(best, "trainer_state.json")) as f:
        assert '"_tmp-' not in f.read()
