"""Checkpoints of a distillation run: every override of a private ``Trainer`` method lives here, so a
transformers upgrade is checked in this one file.

- ``checkpoint-N/`` is written under ``_tmp-checkpoint-N/`` and renamed when complete (atomic: a job killed at
  any moment leaves a complete checkpoint or none);
- it holds the student in its export layout, the method's state (heads, prompts, PAT's feedback) in
  ``distill_state.safetensors`` and a manifest (``distill_manifest.json``: teacher, student, method settings,
  classes) that resuming compares with the current run, refusing another run's checkpoints;
- ``checkpoint_files.json`` (size and sha256 of every file) is written last, inside the staging folder;
  resuming verifies it and, with ``resume_from_checkpoint=True``, falls back to the newest complete checkpoint
  (:mod:`pat_hf.checkpoint_integrity`); a failed save (a full disk) removes the partial folder and says so;
- rotation (``save_total_limit``) keeps the best checkpoint under its final name;
- ``_save`` exports the student alone (``save_model()``, written to a staging folder, then moved in place; the
  model EMA's weights when ``export_weights`` selects them), checkpoints add the method state, the model EMA
  (``ema.safetensors``) and the manifest;
- the output folder is claimed before training (:mod:`pat_hf.training.output_dir`: source folders refused, foreign
  files refused, one run at a time, the run marker).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

try:  # transformers >= 5.x: a function; earlier releases: Trainer._rotate_checkpoints
    from transformers.trainer_utils import rotate_checkpoints as _rotate_checkpoints
except ImportError:  # pragma: no cover - depends on the installed transformers
    _rotate_checkpoints = None

from ..checkpoint_integrity import (
    list_checkpoints,
    manifest_differences,
    save_failure,
    verify_checkpoint,
    write_file_list,
)
from ..errors import CheckpointError, OutputDirError
from ..models.export import SAFE_WEIGHTS_NAME, export_student, load_student_weights
from ..models.student import is_timm_model, is_transformers_model, student_build_args, student_num_classes
from ..version import __version__
from .ema import EMA_WEIGHTS_NAME, find_model_ema
from .output_dir import MARKER_NAME, check_output_dir, read_marker, write_marker
from .progress_check import parameter_fingerprint

__all__ = ["DISTILL_STATE_NAME", "MANIFEST_NAME", "STAGING_PREFIX", "CheckpointMixin"]

logger = logging.getLogger(__name__)

DISTILL_STATE_NAME = "distill_state.safetensors"
MANIFEST_NAME = "distill_manifest.json"
EXTRA_STATE_PREFIX = "__extra__."
TRAINING_ARGS_NAME = "training_args.bin"
TRAINER_STATE_NAME = "trainer_state.json"
VIEW_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
# Checkpoints are written under this prefix and renamed when complete. The leading underscore keeps the
# folder out of `checkpoint-*` globs and out of Trainer.push_to_hub's uploads (it ignores "_*").
STAGING_PREFIX = "_tmp-"


class CheckpointMixin:
    """Atomic checkpoints with the method's state and a run manifest, for :class:`pat_hf.PATDistillationTrainer`
    (mixed in before ``Trainer``)."""

    def _check_checkpoints_before_train(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """Picks the checkpoint to resume from, or refuses to resume from / train over another run's.

        ``True``: the newest complete checkpoint (a broken newer one is skipped with a warning naming its file).
        A path: that checkpoint, which must be complete. None: any ``checkpoint-N`` already in ``output_dir``
        must belong to this run.

        Returns:
            The checkpoint folder to resume from, or None.

        Raises:
            CheckpointError: No checkpoint, no complete one, a broken explicit one (naming the file), or another
                run's (listing the differences).
        """
        run_dir = self.args.output_dir
        if resume_from_checkpoint is True:
            candidates = list_checkpoints(run_dir)
            if not candidates:
                raise CheckpointError(f"resume_from_checkpoint=True but {run_dir!r} holds no checkpoint-N folder.")
            broken = []
            for path in candidates:
                # A folder without file list (or manifest) is an incomplete copy, unless pat_hf 0.1 wrote it.
                problems = verify_checkpoint(path)
                if problems:
                    logger.warning("Not resuming from %s: %s", path, "; ".join(problems[:3]))
                    broken.append(f"{os.path.basename(path)}: {problems[0]}")
                    continue
                self._check_manifest(path)
                if broken:
                    logger.warning(
                        "Resuming from %s, the newest complete checkpoint (skipped: %s).", path, "; ".join(broken)
                    )
                return path
            raise CheckpointError(
                f"No complete checkpoint in {run_dir!r} to resume from:\n  " + "\n  ".join(broken) + "\nDelete "
                "the broken folders to start over, or restore their files."
            )
        if isinstance(resume_from_checkpoint, str):
            if not os.path.isdir(resume_from_checkpoint):
                raise CheckpointError(f"resume_from_checkpoint {resume_from_checkpoint!r} is not a folder.")
            if os.path.isfile(os.path.join(resume_from_checkpoint, MANIFEST_NAME)):
                problems = verify_checkpoint(resume_from_checkpoint)
                if problems:
                    raise CheckpointError(
                        f"Cannot resume from {resume_from_checkpoint!r}: it is incomplete or corrupted:\n  "
                        + "\n  ".join(problems[:10])
                        + "\nResume from another checkpoint (resume_from_checkpoint=True takes the newest complete one)."
                    )
            self._check_manifest(resume_from_checkpoint)
            return resume_from_checkpoint
        for path in list_checkpoints(run_dir) if not self.args.overwrite_output_dir else []:
            self._check_manifest(path, resuming=False)
        return None

    def _claim_output_dir(self, output_dir: str) -> None:
        """Refuses a source folder, foreign files, or the marker of another run, then writes this run's marker
        (main process). See :mod:`pat_hf.training.output_dir`."""
        overwrite = self.args.overwrite_output_dir
        check_output_dir(output_dir, protected=self._protected_dirs, overwrite=overwrite)
        current = self._current_manifest()
        marker = read_marker(output_dir)
        diffs = manifest_differences(marker.get("run") or {}, current, saved_name="there") if marker is not None else []
        if diffs and not overwrite:
            raise OutputDirError(
                f"output_dir {output_dir!r} holds the export of another run ({MARKER_NAME}):\n  "
                + "\n  ".join(diffs)
                + "\nChoose another output_dir, or pass overwrite_output_dir=True to replace it."
            )
        if self.args.should_save and (marker is None or diffs):  # a marker of this same run keeps its bytes
            write_marker(output_dir, current)

    def _current_manifest(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.manifest(), default=str))

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
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            self.accelerator.wait_for_everyone()  # every rank has written its RNG state
            if self.args.should_save:
                write_file_list(staged)  # last: its presence means every file above is complete
        except (OSError, RuntimeError) as err:
            previous = list_checkpoints(run_dir)
            intact = (
                f"the previous checkpoints are intact (newest: {os.path.basename(previous[0])})"
                if previous
                else "no earlier checkpoint was touched"
            )
            failure = save_failure(err, staging, name, intact)
            shutil.rmtree(staging, ignore_errors=True)
            raise failure from err
        finally:
            self._staging_dir = None
        if self.args.should_save:
            _replace_dir(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            if getattr(self, "_deferred_checkpoint_push", False):
                self._deferred_checkpoint_push = False
                self._push_from_checkpoint(final)  # complete now, file list included (HubPushMixin)
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
        """What defines this run; stored in every checkpoint (and the run marker) and compared on resume."""
        student = self.student
        timm_student = is_timm_model(student)
        description: dict[str, Any] = {
            "class": type(student).__name__,
            "architecture": student.pretrained_cfg.get("architecture") if timm_student else type(student).__name__,
            "num_classes": student_num_classes(student),
        }
        if timm_student:
            args = student_build_args(student, self.student_model_args)
            args.pop("num_classes", None)
            description["model_args"] = args
            description["pretrained_cfg"] = {k: student.pretrained_cfg.get(k) for k in VIEW_KEYS}
        else:
            description["view"] = self.accelerator.unwrap_model(self.model).student_view.to_dict()
        return {
            "pat_hf_version": __version__,
            "method": self.method.settings(),
            "teacher": self.teacher.describe() if self.teacher is not None else None,
            "student": description,
            "class_names": self.class_names,
            "ema": _ema_manifest(self),
            # Informational (not compared on resume): the training augmentation, as the data was prepared.
            "augmentation": self.augmentation.to_dict() if getattr(self, "augmentation", None) else None,
        }

    @staticmethod
    def _read_manifest(checkpoint: str) -> dict[str, Any]:
        with open(os.path.join(checkpoint, MANIFEST_NAME), encoding="utf-8") as f:
            return json.load(f)

    def _check_manifest(self, checkpoint: str, resuming: bool = True) -> None:
        path = os.path.join(checkpoint, MANIFEST_NAME)
        if not os.path.isfile(path):
            if resuming and not os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME)):
                raise CheckpointError(f"{checkpoint!r} is not a checkpoint folder (no {SAFE_WEIGHTS_NAME}).")
            raise CheckpointError(
                f"{checkpoint!r} was not written by pat_hf (no {MANIFEST_NAME}). "
                + ("Cannot resume from it." if resuming else "Use another output_dir, or move its checkpoints away.")
            )
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{path} is not valid JSON ({err}): the checkpoint is corrupted, and whose run it is cannot be told. "
                "Delete that checkpoint folder, or resume with resume_from_checkpoint=True (it skips broken ones)."
            ) from None
        current = self._current_manifest()
        diffs = manifest_differences(saved, current)
        if current["ema"] is not None and saved.get("ema") != current["ema"]:
            # An EMA run needs the checkpoint's EMA (a run without one cannot be resumed exactly).
            diffs.append(f"ema: checkpoint {saved.get('ema') or 'has no model EMA'} vs now {current['ema']}")
        if diffs:
            details = "\n  " + "\n  ".join(diffs) + "\n"
            if resuming:
                raise CheckpointError(
                    f"Cannot resume from {checkpoint!r}: it belongs to another run.{details}"
                    "Resume with the same teacher, method settings and student, or start a new run in another output_dir."
                )
            raise CheckpointError(
                f"output_dir {self.args.output_dir!r} holds checkpoints of another run "
                f"({os.path.basename(checkpoint)}).{details}"
                "Choose another output_dir, delete those checkpoints, resume that run with resume_from_checkpoint, "
                "or pass overwrite_output_dir=True to train over them."
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
        try:
            load_student_weights(wrapper.student, resume_from_checkpoint)
            if not getattr(self, "_loading_best_model", False):
                # Did the resumed training change the student? Compared with the weights loaded here (progress_check).
                self._student_fingerprint = parameter_fingerprint(wrapper.student)
        except (RuntimeError, OSError) as err:  # a shape mismatch, an unreadable file
            raise CheckpointError(
                f"The student's weights in {os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)} do not load "
                f"into this student ({str(err).splitlines()[0]})."
            ) from err
        state_path = os.path.join(resume_from_checkpoint, DISTILL_STATE_NAME)
        if wrapper.method.state_dict() and not os.path.isfile(state_path):
            raise CheckpointError(f"{resume_from_checkpoint!r} lacks {DISTILL_STATE_NAME} with the method's state.")
        if os.path.isfile(state_path):
            from safetensors.torch import load_file

            try:
                saved = load_file(state_path, device=str(self.args.device))
            except Exception as err:
                raise CheckpointError(f"{state_path} cannot be read ({err}).") from err
            extra = {k[len(EXTRA_STATE_PREFIX) :]: v for k, v in saved.items() if k.startswith(EXTRA_STATE_PREFIX)}
            state = {k: v for k, v in saved.items() if not k.startswith(EXTRA_STATE_PREFIX)}
            expected = wrapper.method.state_dict()
            mismatched = sorted(set(state) ^ set(expected)) + sorted(
                k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
            )
            if mismatched:
                version = self._read_manifest(resume_from_checkpoint).get("pat_hf_version", "unknown")
                raise CheckpointError(
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
                raise CheckpointError(
                    f"{resume_from_checkpoint!r} lacks {EMA_WEIGHTS_NAME}, the model EMA this run keeps."
                )
            from safetensors.torch import load_file

            ema.attach(wrapper.student)
            ema.load_state_dict(load_file(ema_path, device=str(next(ema.module.parameters()).device)))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            names = ", ".join(
                n for n in ("optimizer.pt", "scheduler.pt") if os.path.isfile(os.path.join(checkpoint, n))
            )
            raise CheckpointError(
                f"The optimizer / scheduler state in {checkpoint} ({names}) cannot be loaded "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})."
            ) from err

    def _load_best_model(self) -> None:
        logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric)
        self._loading_best_model = True
        try:
            self._load_from_checkpoint(self.state.best_model_checkpoint)
        finally:
            self._loading_best_model = False

    # ---- saving and export -------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Writes the student in timm's layout; checkpoints also get the method state and the manifest. An
        export goes to a staging folder first, then each file is moved in place (a full disk leaves the previous
        export whole)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        if os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
            self._write_student(output_dir, state_dict, checkpoint=True)
            return
        self._claim_output_dir(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX + "export-", dir=output_dir)
        try:
            try:
                self._write_student(staging, state_dict, checkpoint=False)
            except (OSError, RuntimeError) as err:
                raise save_failure(err, staging, "the export", "the files already in place are unchanged") from err
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_student(self, output_dir: str, state_dict: dict[str, torch.Tensor] | None, checkpoint: bool) -> None:
        os.makedirs(output_dir, exist_ok=True)
        wrapper = self.accelerator.unwrap_model(self.model)
        if state_dict is None:  # under FSDP/DeepSpeed Trainer passes the gathered state dict
            state_dict = wrapper.state_dict()
        student_sd = {k[len("student.") :]: v for k, v in state_dict.items() if k.startswith("student.")}
        method_sd = {k[len("method.") :]: v for k, v in state_dict.items() if k.startswith("method.")}
        ema = find_model_ema(self)
        if ema is not None and ema.module is not None and not checkpoint and self.exported_weights() == "ema":
            student_sd = ema.state_dict()  # the export is the averaged student (the card says so)
        export_student(
            wrapper.student,
            output_dir,
            state_dict=student_sd,
            class_names=self.class_names,
            model_args=self.student_model_args,
            model_class=wrapper.student_model_class,
            card=None if checkpoint else self.model_card_info(),
            image_processor=self.processing_class if is_transformers_model(wrapper.student) else None,
        )
        if checkpoint:
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
        if entry.startswith(STAGING_PREFIX) and (
            PREFIX_CHECKPOINT_DIR in entry or entry.startswith(STAGING_PREFIX + "export-")
        ):
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
