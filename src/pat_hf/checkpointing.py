"""Checkpoints of a distillation run: every override of a private ``Trainer`` method lives here, so a
transformers upgrade is checked in this one file.

- ``checkpoint-N/`` is written under ``_tmp-checkpoint-N/`` and renamed when complete (atomic: a job killed at
  any moment leaves a complete checkpoint or none);
- it holds the student in its export layout, the method's state (heads, prompts, PAT's feedback) in
  ``distill_state.safetensors`` and a manifest (``distill_manifest.json``: teacher, student, method settings,
  classes) that resuming compares with the current run, refusing another run's checkpoints;
- rotation (``save_total_limit``) keeps the best checkpoint under its final name;
- ``_save`` exports the student alone (``save_model()``; the model EMA's weights when ``export_weights`` selects
  them), checkpoints add the method state, the model EMA (``ema.safetensors``) and the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

try:  # transformers >= 5.x: a function; earlier releases: Trainer._rotate_checkpoints
    from transformers.trainer_utils import rotate_checkpoints as _rotate_checkpoints
except ImportError:  # pragma: no cover - depends on the installed transformers
    _rotate_checkpoints = None

from .ema import EMA_WEIGHTS_NAME, find_model_ema
from .export import SAFE_WEIGHTS_NAME, export_student, load_student_weights
from .student import is_timm_model, is_transformers_model, student_num_classes
from .version import __version__

__all__ = ["DISTILL_STATE_NAME", "MANIFEST_NAME", "STAGING_PREFIX", "CheckpointMixin"]

logger = logging.getLogger(__name__)

DISTILL_STATE_NAME = "distill_state.safetensors"
MANIFEST_NAME = "distill_manifest.json"
EXTRA_STATE_PREFIX = "__extra__."
TRAINING_ARGS_NAME = "training_args.bin"
TRAINER_STATE_NAME = "trainer_state.json"
# Checkpoints are written under this prefix and renamed when complete. The leading underscore keeps the
# folder out of `checkpoint-*` globs and out of Trainer.push_to_hub's uploads (it ignores "_*").
STAGING_PREFIX = "_tmp-"


class CheckpointMixin:
    """Atomic checkpoints with the method's state and a run manifest, for :class:`pat_hf.PATDistillationTrainer`
    (mixed in before ``Trainer``)."""

    def _check_checkpoints_before_train(self, resume_from_checkpoint: str | bool | None) -> None:
        """Refuses to resume from, or to train over, another run's checkpoints (see :meth:`manifest`)."""
        if resume_from_checkpoint is True:
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if last is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir!r} holds no checkpoint-N folder."
                )
            self._check_manifest(last)
        elif isinstance(resume_from_checkpoint, str):
            self._check_manifest(resume_from_checkpoint)
        elif resume_from_checkpoint is None and os.path.isdir(self.args.output_dir):
            for name in sorted(os.listdir(self.args.output_dir)):
                path = os.path.join(self.args.output_dir, name)
                if name.startswith(PREFIX_CHECKPOINT_DIR) and os.path.isdir(path):
                    self._check_manifest(path, resuming=False)

    def _get_output_dir(self, trial: Any) -> str:
        # While a checkpoint is being written, Trainer's writers see a staging folder as the run directory.
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Writes ``checkpoint-N`` atomically: everything (weights, method state, manifest, optimizer, RNG
        states of every rank, trainer state) goes to ``_tmp-checkpoint-N/checkpoint-N`` first, and the folder is
        renamed to ``checkpoint-N`` once complete. A job killed while saving leaves only the ``_tmp-`` folder,
        which resume ignores and the next save removes."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
        staged = os.path.join(staging, name)
        if self.args.should_save:
            _remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()
        if (ema := find_model_ema(self)) is not None:
            ema.broadcast_buffers()  # every rank holds, and rank 0 saves, rank 0's EMA statistics
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        if self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            _replace_dir(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate(run_dir)
        self.accelerator.wait_for_everyone()
        # Nodes without a shared file system hold their own ranks' RNG states: each node's first process
        # renames what it wrote, as Trainer would have written it straight to checkpoint-N.
        if not self.args.should_save and self.args.local_process_index == 0 and os.path.isdir(staged):
            _replace_dir(staged, final)
            shutil.rmtree(staging, ignore_errors=True)

    def _rotate(self, run_dir: str) -> None:
        if _rotate_checkpoints is not None:
            _rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        elif hasattr(self, "_rotate_checkpoints"):  # pragma: no cover - older transformers
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)

    def manifest(self) -> dict[str, Any]:
        """What defines this run; stored in every checkpoint and compared on resume."""
        student = self.student
        return {
            "pat_hf_version": __version__,
            "method": self.method.settings(),
            "teacher": self.teacher.describe() if self.teacher is not None else None,
            "student": {
                "class": type(student).__name__,
                "architecture": student.pretrained_cfg.get("architecture")
                if is_timm_model(student)
                else type(student).__name__,
                "num_classes": student_num_classes(student),
            },
            "class_names": self.class_names,
            "ema": _ema_manifest(self),
        }

    @staticmethod
    def _read_manifest(checkpoint: str) -> dict[str, Any]:
        with open(os.path.join(checkpoint, MANIFEST_NAME), encoding="utf-8") as f:
            return json.load(f)

    def _check_manifest(self, checkpoint: str, resuming: bool = True) -> None:
        path = os.path.join(checkpoint, MANIFEST_NAME)
        if not os.path.isfile(path):
            if resuming and not os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME)):
                raise ValueError(f"{checkpoint!r} is not a checkpoint folder (no {SAFE_WEIGHTS_NAME}).")
            raise ValueError(
                f"{checkpoint!r} was not written by pat_hf (no {MANIFEST_NAME}). "
                + ("Cannot resume from it." if resuming else "Use another output_dir, or move its checkpoints away.")
            )
        saved = self._read_manifest(checkpoint)
        current = self.manifest()
        diffs = []
        for key in ("method", "teacher", "student", "class_names"):
            a, b = saved.get(key), current.get(key)
            if key == "teacher" and a and b:
                a = {k: a.get(k) for k in ("architecture", "fingerprint", "revision")}
                b = {k: b.get(k) for k in ("architecture", "fingerprint", "revision")}
            if a != b:
                diffs.append(f"{key}: checkpoint {a} vs now {b}")
        if current["ema"] is not None and saved.get("ema") != current["ema"]:
            # An EMA run needs the checkpoint's EMA (a run without one cannot be resumed exactly).
            diffs.append(f"ema: checkpoint {saved.get('ema') or 'has no model EMA'} vs now {current['ema']}")
        if diffs:
            details = "\n  " + "\n  ".join(diffs) + "\n"
            if resuming:
                raise ValueError(
                    f"Cannot resume from {checkpoint!r}: it belongs to another run.{details}"
                    "Resume with the same teacher, method settings and student, or start a new run in another output_dir."
                )
            raise ValueError(
                f"output_dir {self.args.output_dir!r} holds checkpoints of another run "
                f"({os.path.basename(checkpoint)}).{details}"
                "Choose another output_dir, delete those checkpoints, or resume that run with resume_from_checkpoint."
            )
        if not resuming:
            logger.warning(
                "%s holds checkpoints of this same run; training from scratch will overwrite them "
                "(pass resume_from_checkpoint=True to continue instead).",
                self.args.output_dir,
            )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._check_manifest(resume_from_checkpoint)
        wrapper = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_student_weights(wrapper.student, resume_from_checkpoint)
        state_path = os.path.join(resume_from_checkpoint, DISTILL_STATE_NAME)
        if wrapper.method.state_dict() and not os.path.isfile(state_path):
            raise ValueError(f"{resume_from_checkpoint!r} lacks {DISTILL_STATE_NAME} with the method's state.")
        if os.path.isfile(state_path):
            from safetensors.torch import load_file

            saved = load_file(state_path, device=str(self.args.device))
            extra = {k[len(EXTRA_STATE_PREFIX) :]: v for k, v in saved.items() if k.startswith(EXTRA_STATE_PREFIX)}
            state = {k: v for k, v in saved.items() if not k.startswith(EXTRA_STATE_PREFIX)}
            expected = wrapper.method.state_dict()
            mismatched = sorted(set(state) ^ set(expected)) + sorted(
                k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
            )
            if mismatched:
                version = self._read_manifest(resume_from_checkpoint).get("pat_hf_version", "unknown")
                raise ValueError(
                    f"{state_path} does not fit the {wrapper.method.name!r} heads of this pat_hf ({__version__}); it was "
                    f"written by pat_hf {version} (first differing tensors: {mismatched[:4]}). pat_hf 0.2 made PAT's "
                    "aligners identical to the official modules (no 1x1-conv biases, the token aligner's norms over the "
                    "queries and the channels), so a PAT checkpoint of 0.1 cannot be resumed: start a new run in "
                    "another output_dir, or finish that run with pat_hf 0.1."
                )
            wrapper.method.load_state_dict(state)
            wrapper.method.load_extra_state_tensors(extra)
        if (ema := find_model_ema(self)) is not None:
            ema_path = os.path.join(resume_from_checkpoint, EMA_WEIGHTS_NAME)
            if not os.path.isfile(ema_path):
                raise ValueError(f"{resume_from_checkpoint!r} lacks {EMA_WEIGHTS_NAME}, the model EMA this run keeps.")
            from safetensors.torch import load_file

            ema.attach(wrapper.student)
            ema.load_state_dict(load_file(ema_path, device=str(next(ema.module.parameters()).device)))

    def _load_best_model(self) -> None:
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric)
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ---- saving and export -------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Writes the student in timm's layout; checkpoints also get the method state and the manifest."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        wrapper = self.accelerator.unwrap_model(self.model)
        if state_dict is None:  # under FSDP/DeepSpeed Trainer passes the gathered state dict
            state_dict = wrapper.state_dict()
        student_sd = {k[len("student.") :]: v for k, v in state_dict.items() if k.startswith("student.")}
        method_sd = {k[len("method.") :]: v for k, v in state_dict.items() if k.startswith("method.")}
        is_checkpoint = os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR)
        ema = find_model_ema(self)
        if ema is not None and ema.module is not None and not is_checkpoint and self.exported_weights() == "ema":
            student_sd = ema.state_dict()  # the export is the averaged student (the card says so)
        export_student(
            wrapper.student,
            output_dir,
            state_dict=student_sd,
            class_names=self.class_names,
            model_args=self.student_model_args,
            model_class=wrapper.student_model_class,
            card=None if is_checkpoint else self.model_card_info(),
            image_processor=self.processing_class if is_transformers_model(wrapper.student) else None,
        )
        if is_checkpoint:
            extra = {EXTRA_STATE_PREFIX + k: v for k, v in wrapper.method.extra_state_tensors().items()}
            if method_sd or extra:
                from safetensors.torch import save_file

                tensors = {k: v.detach().cpu().contiguous().clone() for k, v in {**method_sd, **extra}.items()}
                save_file(tensors, os.path.join(output_dir, DISTILL_STATE_NAME), metadata={"format": "pt"})
            if ema is not None and ema.module is not None:
                from safetensors.torch import save_file

                tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ema.state_dict().items()}
                save_file(tensors, os.path.join(output_dir, EMA_WEIGHTS_NAME), metadata={"format": "pt"})
            with open(os.path.join(output_dir, MANIFEST_NAME), "w", encoding="utf-8") as f:
                json.dump(self.manifest(), f, indent=2)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


def _ema_manifest(trainer: Any) -> dict[str, Any] | None:
    """The manifest's record of the model EMA (settings and file), None without one."""
    ema = find_model_ema(trainer)
    return None if ema is None else {**ema.settings(), "file": EMA_WEIGHTS_NAME}


def _remove_stale_staging(run_dir: str) -> None:
    """Removes the ``_tmp-checkpoint-*`` folders left by a job killed while it saved."""
    if not os.path.isdir(run_dir):
        return
    for entry in os.listdir(run_dir):
        if entry.startswith(STAGING_PREFIX) and PREFIX_CHECKPOINT_DIR in entry:
            logger.warning("Removing %s, an incomplete checkpoint left by an interrupted save.", entry)
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


def _replace_dir(source: str, target: str) -> None:
    """Renames ``source`` to ``target``; an existing ``target`` (the same step saved again after a resume) is
    moved aside first and deleted only once the new folder is in place."""
    old = None
    if os.path.exists(target):
        old = os.path.join(os.path.dirname(target), STAGING_PREFIX + "old-" + os.path.basename(target))
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
