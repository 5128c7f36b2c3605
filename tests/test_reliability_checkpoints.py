"""Checkpoints are verified before resuming: a broken one is named, and ``resume_from_checkpoint=True`` falls back
to the newest complete one; the manifest records the student's build arguments and preprocessing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import TrainerCallback

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.checkpoint_integrity import FILE_LIST_NAME, sha256_of, verify_checkpoint
from pat_hf.errors import CheckpointError
from support.files import folder_hashes, truncate
from support.tiny import make_image_dataset, tiny_args, tiny_teacher

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_v0_1_ofa")


def make_trainer(output_dir, student=None, dataset=None, **overrides):
    torch.manual_seed(0)
    teacher = tiny_teacher("vit")
    student = student if student is not None else create_student("test_resnet", num_classes=3, img_size=16)
    if dataset is None:
        dataset = with_image_transforms(
            make_image_dataset(n=16, size=16),
            ImageView.from_timm(student),
            ImageView.from_config(teacher.config),
            train=True,
        )
    settings = dict(
        distill_method="kd", per_device_train_batch_size=4, max_steps=6, save_strategy="steps", save_steps=2
    )
    args = tiny_args(output_dir.parent, output_dir=str(output_dir), **{**settings, **overrides})
    return PATDistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=dataset)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run with checkpoint-2, -4 and -6 (copied by each test)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    make_trainer(out).train()
    return out


@pytest.fixture
def run(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_every_checkpoint_lists_its_files_with_size_and_hash(run):
    for step in (2, 4, 6):
        folder = run / f"checkpoint-{step}"
        listing = json.loads((folder / FILE_LIST_NAME).read_text())["files"]
        on_disk = {p for p in folder_hashes(folder) if p != FILE_LIST_NAME}
        assert (
            set(listing)
            == on_disk
            >= {"model.safetensors", "optimizer.pt", "trainer_state.json", "distill_manifest.json"}
        )
        for name, meta in listing.items():
            assert meta == {"size": os.path.getsize(folder / name), "sha256": sha256_of(str(folder / name))}
        assert verify_checkpoint(str(folder)) == []


class StepsTaken(TrainerCallback):
    def __init__(self) -> None:
        self.taken = []

    def on_step_end(self, args, state, control, **kwargs):
        self.taken.append(state.global_step)


def break_file(path, how: str) -> None:
    if how == "truncate":
        truncate(path)
    elif how == "invalid-json":
        path.write_text('{"method": ')
    elif how == "flip-a-byte":  # same size: only the hash tells
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("name", "how", "problem"),
    [
        ("model.safetensors", "truncate", "truncated or replaced"),
        ("optimizer.pt", "truncate", "truncated or replaced"),
        ("distill_manifest.json", "invalid-json", "truncated or replaced"),
        ("model.safetensors", "flip-a-byte", "sha256 differs"),
        ("trainer_state.json", "delete", "missing"),
    ],
)
def test_a_broken_latest_checkpoint_falls_back_to_the_newest_complete_one(run, caplog, name, how, problem):
    broken = run / "checkpoint-6" / name
    if how == "delete":
        broken.unlink()
    else:
        break_file(broken, how)
    previous = folder_hashes(run / "checkpoint-4")
    trainer = make_trainer(run, max_steps=8)
    steps = StepsTaken()
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=True)
    assert f"Not resuming from {run / 'checkpoint-6'}: {broken}: " in caplog.text and problem in caplog.text
    assert "Resuming from" in caplog.text and "checkpoint-4" in caplog.text
    assert trainer.state.global_step == 8
    assert steps.taken == [5, 6, 7, 8]  # continued from step 4
    assert folder_hashes(run / "checkpoint-4") == previous
    assert verify_checkpoint(str(run / "checkpoint-6")) == []  # rewritten whole


def test_a_broken_checkpoint_given_by_path_is_an_error_naming_the_file(run):
    truncate(run / "checkpoint-6" / "optimizer.pt")
    before = folder_hashes(run)
    trainer = make_trainer(run, max_steps=8)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)Cannot resume from .*checkpoint-6.*incomplete or corrupted.*optimizer.pt: \d+ bytes, but \d+ were written.*resume_from_checkpoint=True",
    ):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-6"))
    assert folder_hashes(run) == before
    with pytest.raises(CheckpointError, match="is not a folder"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-60"))


def test_no_complete_checkpoint_lists_each_broken_file(run):
    for step in (2, 4, 6):
        truncate(run / f"checkpoint-{step}" / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"(?s)No complete checkpoint .*checkpoint-6: .*model.safetensors.*checkpoint-4: .*checkpoint-2: ",
    ):
        make_trainer(run, max_steps=8).train(resume_from_checkpoint=True)


def test_training_over_a_checkpoint_with_an_unreadable_manifest_is_refused(run):
    (run / "checkpoint-6" / "distill_manifest.json").write_text("{")
    before = folder_hashes(run)
    with pytest.raises(
        CheckpointError, match=r"distill_manifest.json is not valid JSON .*whose run it is cannot be told"
    ):
        make_trainer(run).train()
    assert folder_hashes(run) == before


def test_a_0_1_checkpoint_with_a_truncated_optimizer_is_named(tmp_path):
    """pat_hf 0.1 wrote no file list: structural checks still name a cut-short file."""
    run = tmp_path / "run"
    shutil.copytree(os.path.join(LEGACY, "checkpoint-4"), run / "checkpoint-4")
    truncate(run / "checkpoint-4" / "optimizer.pt")
    problems = verify_checkpoint(str(run / "checkpoint-4"))
    assert len(problems) == 1 and "optimizer.pt: truncated" in problems[0] and "no zip directory" in problems[0]
    (run / "checkpoint-4" / "trainer_state.json").write_text("{")
    assert any("trainer_state.json: not valid JSON" in p for p in verify_checkpoint(str(run / "checkpoint-4")))


# ---- the student in the manifest ------------------------------------------------------------------------------


def test_resuming_with_another_channel_count_is_refused_listing_it(run):
    manifest = json.loads((run / "checkpoint-6" / "distill_manifest.json").read_text())
    assert manifest["student"]["model_args"]["in_chans"] == 3
    assert manifest["student"]["pretrained_cfg"]["input_size"] == [3, 16, 16]
    student = create_student("test_resnet", num_classes=3, img_size=16, in_chans=1)
    plain = [{"pixel_values": torch.zeros(1, 16, 16), "labels": 0}] * 4  # not prepared by with_image_transforms
    trainer = make_trainer(run, student=student, dataset=plain, max_steps=8)
    with pytest.raises(
        CheckpointError, match=r"(?s)belongs to another run.*student.model_args.in_chans: checkpoint 3 vs now 1"
    ):
        trainer.train(resume_from_checkpoint=True)


def test_resuming_with_another_normalisation_is_refused_listing_it(run):
    student = create_student("test_resnet", num_classes=3, img_size=16, pretrained_cfg_overlay={"mean": (0.25,) * 3})
    trainer = make_trainer(run, student=student, max_steps=8)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)student.pretrained_cfg.mean: checkpoint \[0.5, 0.5, 0.5\] vs now \[0.25, 0.25, 0.25\]",
    ):
        trainer.train(resume_from_checkpoint=True)
