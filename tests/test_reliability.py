"""Nothing is ever overwritten or silently mixed: the output folder guard (source folders, foreign files, the run
marker, the run lock), failed saves, and the loss guard. Checkpoint verification: test_reliability_checkpoints.py.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, ViTImageProcessor

from pat_hf import ImageView, PATDistillationTrainer, create_student, export_student, with_image_transforms
from pat_hf.errors import CheckpointSaveError, DivergedLossError, OutputDirError, RunLockedError
from pat_hf.training.loss_guard import LossGuard
from pat_hf.training.output_dir import LOCK_NAME, MARKER_NAME, RunLock, check_output_dir
from support.files import folder_hashes
from support.tiny import make_image_dataset, tiny_args, tiny_teacher


def make_trainer(output_dir, teacher=None, student=None, method="kd", **overrides):
    torch.manual_seed(0)
    teacher = tiny_teacher("vit") if teacher is None and method != "none" else teacher
    student = student if student is not None else create_student("test_resnet", num_classes=3, img_size=16)
    teacher_view = None
    if method != "none":
        config = teacher.config if hasattr(teacher, "config") else None
        teacher_view = ImageView.from_config(config) if config is not None else None
    train = with_image_transforms(
        make_image_dataset(n=16, size=16), ImageView.from_timm(student), teacher_view, train=True
    )
    defaults = dict(output_dir=str(output_dir), distill_method=method, per_device_train_batch_size=4, max_steps=2)
    args = tiny_args(Path(output_dir).parent, **{**defaults, **overrides})
    return PATDistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=train)


@pytest.fixture
def teacher_dir(tmp_path):
    path = tmp_path / "teacher"
    tiny_teacher("vit", id2label={0: "cat", 1: "dog", 2: "bird"}).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


# ---- the teacher's and the student's folders ------------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_dir_set_to_the_teachers_folder_is_refused_whatever_the_flags(tmp_path, teacher_dir, overwrite):
    before = folder_hashes(teacher_dir)
    with pytest.raises(OutputDirError, match=r"is the folder a model is loaded from .*never writes there"):
        make_trainer(teacher_dir, teacher=str(teacher_dir), overwrite_output_dir=overwrite)
    assert folder_hashes(teacher_dir) == before


def test_a_teacher_loaded_in_memory_from_a_folder_protects_that_folder(tmp_path, teacher_dir):
    from transformers import AutoModelForImageClassification

    before = folder_hashes(teacher_dir)
    teacher = AutoModelForImageClassification.from_pretrained(teacher_dir)
    with pytest.raises(OutputDirError, match="folder a model is loaded from"):
        make_trainer(teacher_dir / "sub", teacher=teacher)  # inside it is refused too
    assert folder_hashes(teacher_dir) == before


def test_save_model_into_the_teachers_folder_is_refused(tmp_path, teacher_dir):
    before = folder_hashes(teacher_dir)
    trainer = make_trainer(tmp_path / "out", teacher=str(teacher_dir))
    with pytest.raises(OutputDirError, match="never writes there"):
        trainer.save_model(str(teacher_dir))
    assert folder_hashes(teacher_dir) == before


def test_output_dir_set_to_the_students_local_dir_is_refused(tmp_path):
    source = tmp_path / "student"
    export_student(create_student("test_resnet", num_classes=3, img_size=16), source)
    before = folder_hashes(source)
    with pytest.raises(OutputDirError, match="folder a model is loaded from"):
        make_trainer(source, student=create_student(f"local-dir:{source}", num_classes=3), overwrite_output_dir=True)
    assert folder_hashes(source) == before


def test_output_dir_inside_the_hub_cache_is_refused(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(OutputDirError, match="inside the Hub cache"):
        check_output_dir(str(tmp_path / "hub" / "models--org--name" / "snapshots"), protected=[str(tmp_path / "hub")])
    with pytest.raises(OutputDirError, match="Hub cache"):
        make_trainer(tmp_path / "hub" / "run")


# ---- files no pat_hf run wrote ----------------------------------------------------------------------------------


def test_output_dir_holding_another_model_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    tiny_teacher("resnet").save_pretrained(out)
    before = folder_hashes(out)
    trainer = make_trainer(out)
    with pytest.raises(
        OutputDirError, match=r"holds a model \(config.json, model.safetensors\) not written by a pat_hf"
    ):
        trainer.train()
    assert folder_hashes(out) == before and not (out / LOCK_NAME).exists()
    with pytest.raises(OutputDirError, match="overwrite_output_dir"):
        trainer.save_model()
    assert folder_hashes(out) == before

    make_trainer(out, overwrite_output_dir=True).train()  # asked for: it may replace them
    assert (out / MARKER_NAME).is_file()


def test_output_dir_holding_your_own_files_or_a_file_is_refused(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"holds files not written by a pat_hf run: \['notes.txt'\]"):
        make_trainer(out).train()
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="is a file, not a folder"):
        check_output_dir(str(tmp_path / "file"))


def test_a_pat_hf_0_1_export_without_marker_is_recognised(tmp_path):
    out = tmp_path / "old"
    export_student(create_student("test_resnet", num_classes=3), out)
    (out / "README.md").write_text("---\nlibrary_name: timm\ntags:\n- image-classification\n- pat_hf\n---\n# card\n")
    (out / "training_args.bin").write_bytes(b"x")
    check_output_dir(str(out))  # pat_hf's names and a pat_hf model card
    (out / "README.md").write_text("---\ntags:\n- timm\n---\n")
    with pytest.raises(OutputDirError, match="not written by a pat_hf run"):
        check_output_dir(str(out))


def test_the_export_of_another_run_is_refused_and_the_same_run_reruns(tmp_path):
    out = tmp_path / "out"
    first = make_trainer(out)
    first.train()
    first.save_model()
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["run"]["method"]["method"] == "kd" and marker["pat_hf_version"]
    before = folder_hashes(out)
    other = make_trainer(out, temperature=2.0)
    with pytest.raises(
        OutputDirError, match=r"(?s)holds the export of another run.*method.temperature: there 4.0 vs now 2.0"
    ):
        other.train()
    with pytest.raises(OutputDirError, match="another run"):
        other.save_model()
    assert folder_hashes(out) == before
    make_trainer(out).train()  # the same run again: accepted, the marker's bytes kept
    assert folder_hashes(out)[MARKER_NAME] == before[MARKER_NAME]


# ---- one run at a time ----------------------------------------------------------------------------------------


def write_lock(folder, pid, host=None) -> None:
    os.makedirs(folder, exist_ok=True)
    info = {"pid": pid, "host": host or socket.gethostname(), "started": 0}
    with open(os.path.join(folder, LOCK_NAME), "w") as f:
        json.dump(info, f)


def test_a_second_run_in_the_same_output_dir_is_refused_then_a_stale_lock_is_taken_over(tmp_path, caplog):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, sleeper.pid)
        trainer = make_trainer(out)
        with pytest.raises(RunLockedError, match=rf"Another run is training in .*process {sleeper.pid}"):
            trainer.train()
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # nothing written
    finally:
        sleeper.kill()
        sleeper.wait()
    trainer.train()  # its process is gone: the lock is stale
    assert "Taking over" in caplog.text
    assert not (out / LOCK_NAME).exists() and (out / MARKER_NAME).is_file()


def test_a_lock_from_another_host_is_respected(tmp_path):
    write_lock(tmp_path, 1, host="another-machine")
    with pytest.raises(RunLockedError, match="another-machine"):
        RunLock(str(tmp_path)).acquire()


def test_the_lock_is_released_when_training_fails(tmp_path):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    trainer = make_trainer(tmp_path / "out")
    trainer.add_callback(Boom())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert not (tmp_path / "out" / LOCK_NAME).exists()


# ---- failed saves --------------------------------------------------------------------------------------------


def fail_when_writing(monkeypatch, target: str, error: Exception, free: int | None) -> None:
    """torch.save and safetensors' save_file raise ``error`` for paths containing ``target``; the disk reports
    ``free`` bytes."""
    import shutil

    import safetensors.torch

    import pat_hf.checkpoint_integrity as integrity

    real_save, real_save_file = torch.save, safetensors.torch.save_file

    def save(obj, f, *args, **kwargs):
        if target in str(f):
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04partial")
            raise error
        return real_save(obj, f, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        if target in str(filename):
            raise error
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    if free is not None:
        monkeypatch.setattr(
            integrity.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - free, free)
        )


def test_a_full_disk_during_a_checkpoint_save_says_so_and_keeps_the_previous_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = make_trainer(out, max_steps=4, save_strategy="steps", save_steps=2)
    fail_when_writing(
        monkeypatch,
        "checkpoint-4",
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 512 vs 448"),
        free=4096,
    )
    with pytest.raises(
        CheckpointSaveError,
        match=r"(?s)No space left .*checkpoint-4.*0.0 MiB free.*unexpected pos.*previous checkpoints are intact \(newest: checkpoint-2\)",
    ) as info:
        trainer.train()
    assert info.value.errno == errno.ENOSPC
    assert sorted(n for n in os.listdir(out) if n != MARKER_NAME) == ["checkpoint-2"]  # no partial folder left
    from pat_hf.checkpoint_integrity import verify_checkpoint

    assert verify_checkpoint(str(out / "checkpoint-2")) == []
    assert not (out / LOCK_NAME).exists()


def test_another_write_error_names_the_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = make_trainer(out, max_steps=2, save_strategy="steps", save_steps=2)
    fail_when_writing(monkeypatch, "model.safetensors", OSError(errno.EIO, "Input/output error"), free=10**9)
    with pytest.raises(CheckpointSaveError, match=r"Writing checkpoint-2 to .* failed \(OSError.*Input/output error\)"):
        trainer.train()
    assert not any(n.startswith(("_tmp-", "checkpoint-")) for n in os.listdir(out))


def test_a_full_disk_during_the_export_keeps_the_previous_export(tmp_path, monkeypatch):
    out = tmp_path / "out"
    trainer = make_trainer(out)
    trainer.train()
    trainer.save_model()
    before = folder_hashes(out)
    fail_when_writing(monkeypatch, "model.safetensors", OSError(errno.ENOSPC, "No space left on device"), free=None)
    with pytest.raises(CheckpointSaveError, match="No space left on the device while writing the export"):
        trainer.save_model()
    assert folder_hashes(out) == before


# ---- the loss guard --------------------------------------------------------------------------------------------


class BlowUpStudentAt(TrainerCallback):
    """After the given step the student's logits grow huge but stay finite (as a too-high learning rate makes
    them); records the student's weights then."""

    def __init__(self, trainer, step: int, scale: float) -> None:
        self.trainer, self.step, self.scale, self.weights = trainer, step, scale, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.trainer.student.get_classifier().weight.mul_(self.scale)
            self.weights = {k: v.detach().clone() for k, v in self.trainer.student.named_parameters()}


def test_a_loss_diverging_while_finite_stops_before_the_update(tmp_path, monkeypatch):
    monkeypatch.setattr("pat_hf.training.loss_guard.EARLY_STEPS", 3)
    trainer = make_trainer(tmp_path / "out", max_steps=8, divergence_max_loss=0)
    blow_up = BlowUpStudentAt(trainer, 4, 1e7)
    trainer.add_callback(blow_up)
    with pytest.raises(
        DivergedLossError,
        match=r"(?s)diverged at step 5 .*divergence_factor 1000 times its early level.*loss_kd=.*\(early .*divergence_factor=0",
    ):
        trainer.train()
    assert trainer.state.global_step == 4
    for key, value in trainer.student.named_parameters():  # no update (BatchNorm statistics aside)
        torch.testing.assert_close(value, blow_up.weights[key], rtol=0, atol=0, msg=key)


def test_the_absolute_bound_stops_a_loss_that_explodes_early(tmp_path):
    trainer = make_trainer(tmp_path / "out", max_steps=4)
    trainer.add_callback(BlowUpStudentAt(trainer, 1, 1e9))
    with pytest.raises(DivergedLossError, match=r"step 2 .*divergence_max_loss 1e\+06"):
        trainer.train()


def test_the_divergence_guard_can_be_turned_off(tmp_path):
    trainer = make_trainer(tmp_path / "out", max_steps=4, divergence_factor=0, divergence_max_loss=0)
    trainer.add_callback(BlowUpStudentAt(trainer, 1, 1e9))
    trainer.train()
    assert trainer.state.global_step == 4


def test_the_divergence_rule(tmp_path):
    args = tiny_args(tmp_path, divergence_factor=1000.0, divergence_max_loss=0)
    guard = LossGuard(args, type("Accelerator", (), {"num_processes": 1})())
    for _ in range(20):
        guard.check({"ce": torch.tensor(0.5)}, torch.tensor(0.5), 1)  # early level 0.5, counted as 1
    guard.check({"ce": torch.tensor(999.0)}, torch.tensor(999.0), 21)
    with pytest.raises(DivergedLossError, match=r"loss 1001 is more than divergence_factor 1000 .*early level 0.5"):
        guard.check({"ce": torch.tensor(1001.0)}, torch.tensor(1001.0), 22)
    with pytest.raises(ValueError, match="divergence_factor must be > 1"):
        tiny_args(tmp_path, divergence_factor=0.5)
    with pytest.raises(ValueError, match="divergence_max_loss must be >= 0"):
        tiny_args(tmp_path, divergence_max_loss=-1.0)
