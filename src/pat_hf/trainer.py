"""``PATDistillationTrainer``: transformers' Trainer for distilling an image classifier into a timm student."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

try:  # transformers >= 5.x: a function; earlier releases: Trainer._rotate_checkpoints
    from transformers.trainer_utils import rotate_checkpoints as _rotate_checkpoints
except ImportError:  # pragma: no cover - depends on the installed transformers
    _rotate_checkpoints = None

from . import __version__
from .configuration import PATTrainingArguments
from .data import collate_images, dataset_class_names
from .hub import SAFE_WEIGHTS_NAME, ModelCardInfo, export_student, render_model_card
from .methods import get_method
from .metrics import build_compute_metrics
from .modeling import DistillationModel
from .student import (
    check_timm_rebuildable,
    create_student,
    is_timm_model,
    is_transformers_model,
    student_num_classes,
    student_view,
)
from .teacher import Teacher, load_teacher, match_classes

__all__ = ["PATDistillationTrainer"]

logger = logging.getLogger(__name__)

DISTILL_STATE_NAME = "distill_state.safetensors"
MANIFEST_NAME = "distill_manifest.json"
EXTRA_STATE_PREFIX = "__extra__."
TRAINING_ARGS_NAME = "training_args.bin"
TRAINER_STATE_NAME = "trainer_state.json"
# Checkpoints are written under this prefix and renamed when complete. The leading underscore keeps the
# folder out of `checkpoint-*` globs and out of Trainer.push_to_hub's uploads (it ignores "_*").
STAGING_PREFIX = "_tmp-"


class NonFiniteLossError(FloatingPointError):
    """A loss component became NaN or infinite; training stops before the weights or checkpoints are hit."""


class PATDistillationTrainer(Trainer):
    """Trainer that distils a frozen transformers teacher into a timm student.

    The student and the method's trainable heads form one wrapper module (what Trainer optimises, DDP-wraps
    and checkpoints). The teacher stays outside it: frozen, in eval mode, on the training device, under the
    same autocast. ``save_model()`` exports the student alone in timm's Hub layout; ``checkpoint-N/`` folders
    also hold the method's state and a manifest that resume checks.

    Args:
        model: The student: a timm ``nn.Module``, or a timm name / ``hf-hub:`` / ``local-dir:`` id created with
            as many classes as the dataset has. A transformers image classifier also works (to train teachers
            with ``distill_method="none"``).
        teacher: A transformers image classifier, or a Hub id / local path for
            ``AutoModelForImageClassification``. Required unless the method is ``none``.
        args: :class:`PATTrainingArguments`.
        data_collator: Defaults to stacking ``pixel_values``, ``teacher_pixel_values`` and ``labels``.
        train_dataset: Training data yielding those keys (see :func:`pat_hf.data.with_image_transforms`).
        eval_dataset: Evaluation data.
        processing_class: The image processor of a transformers student (saved with its export). Never the
            teacher's.
        compute_metrics: Defaults to top-1 / top-5 accuracy of the student.
        class_names: The dataset's class names; read from the dataset's ClassLabel feature when omitted.
        teacher_image_processor: The teacher's image processor (input size and mean/std); loaded with the
            teacher when it is given by id.
        teacher_revision: Hub revision of the teacher.
        trust_remote_code: Allow custom modelling code for a teacher given by id.
        student_model_args: ``timm.create_model`` arguments the student was built with, for old timm versions
            that do not record them (the export must rebuild the same architecture).
        dataset_name: Name of the training data for the model card (a Hub id is linked as metadata).
        **kwargs: Passed to ``transformers.Trainer`` (callbacks, optimizers, ...).

    Example:
        >>> args = PATTrainingArguments("out", distill_method="kd", num_train_epochs=3)
        >>> trainer = PATDistillationTrainer(
        ...     model="resnet18", teacher="org/vit-finetuned", args=args,
        ...     train_dataset=train, eval_dataset=val)
        >>> trainer.train(); trainer.save_model()
    """

    def __init__(
        self,
        model: nn.Module | str | None = None,
        teacher: nn.Module | str | None = None,
        args: PATTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable | None = None,
        *,
        class_names: list[str] | None = None,
        teacher_image_processor: Any = None,
        teacher_revision: str | None = None,
        trust_remote_code: bool = False,
        student_model_args: dict[str, Any] | None = None,
        dataset_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = PATTrainingArguments(output_dir="pat_hf_output")
        if not isinstance(args, PATTrainingArguments):
            raise TypeError(
                f"args must be PATTrainingArguments (it carries the distillation settings), got {type(args).__name__}."
            )
        if model is None:
            raise ValueError("model= (the student) is required: a timm model or a timm name / hf-hub: / local-dir: id.")
        method_cls = get_method(args.distill_method)

        # Classes: the dataset's names (ClassLabel) define the label space everything is matched to.
        if class_names is None:
            class_names = dataset_class_names(train_dataset) or dataset_class_names(eval_dataset)
        self.class_names: list[str] | None = list(class_names) if class_names else None

        # Teacher.
        self.teacher: Teacher | None = None
        if method_cls.requires_teacher:
            if teacher is None:
                raise ValueError(
                    f"distill_method={args.distill_method!r} needs teacher=; use 'none' to train without one."
                )
            self.teacher = load_teacher(
                teacher,
                image_processor=teacher_image_processor,
                revision=teacher_revision,
                token=args.hub_token,
                trust_remote_code=trust_remote_code,
            )
            self.teacher.class_index = match_classes(
                self.teacher.label_names,
                self.teacher.num_labels,
                self.class_names,
                len(self.class_names) if self.class_names else None,
            )
        elif teacher is not None:
            logger.warning("distill_method=%r uses no teacher; the teacher given is ignored.", args.distill_method)

        num_classes = len(self.class_names) if self.class_names else None
        if num_classes is None and self.teacher is not None:
            num_classes = self.teacher.num_labels if self.teacher.class_index is None else len(self.teacher.class_index)

        # Student.
        if isinstance(model, str):
            model = create_student(model, num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or a timm model name, got {type(model).__name__}.")
        n_student = student_num_classes(model)
        if num_classes is not None and n_student is not None and n_student != num_classes:
            raise ValueError(
                f"The student has {n_student} outputs but the dataset has {num_classes} classes. Create it with "
                f"num_classes={num_classes} (timm.create_model(..., num_classes={num_classes}) or "
                "model.reset_classifier)."
            )
        if student_model_args is None:  # what create_student recorded (older timm records nothing itself)
            student_model_args = getattr(model, "pat_hf_model_args", None)
        if is_timm_model(model):
            check_timm_rebuildable(model, student_model_args)
        elif not is_transformers_model(model):
            raise TypeError(
                f"The student must be a timm model or a transformers image classifier, got {type(model).__name__}."
            )
        self.student_model_args = student_model_args
        self.dataset_name = dataset_name
        view = student_view(model, processing_class)

        method = method_cls(args, model, self.teacher)
        wrapper = DistillationModel(model, method, self.teacher, view)

        if compute_metrics is None:
            compute_metrics = build_compute_metrics()
        if data_collator is None:
            data_collator = collate_images
        super().__init__(
            model=wrapper,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            **kwargs,
        )
        # The loss is a per-batch mean: Trainer must divide it by the accumulation steps (see DistillationModel).
        self.loss_is_scaled_for_ga = False
        if self.teacher is not None:
            # The teacher always runs inside the prepared wrapper's forward, so it inherits its autocast; it only
            # needs to live on this process's device.
            self.teacher.to(self.args.device)
        self._loss_parts: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    # ---- convenience -------------------------------------------------------------------------------------

    @property
    def student(self) -> nn.Module:
        """The student being trained (unwrapped)."""
        return self.accelerator.unwrap_model(self.model).student

    @property
    def method(self) -> nn.Module:
        """The distillation method module (with its heads)."""
        return self.accelerator.unwrap_model(self.model).method

    # ---- optimizer -----------------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """As timm: no weight decay for 1-D parameters (norm weights, biases), scalars such as PAT's beta, and
        what a timm student lists in ``no_weight_decay()`` (position embeddings, cls tokens)."""
        names = super().get_decay_parameter_names(model)
        skip = {name for name, p in model.named_parameters() if p.ndim <= 1}
        student = getattr(model, "student", None)
        if student is not None and hasattr(student, "no_weight_decay"):
            skip |= {f"student.{name}" for name in student.no_weight_decay()}
        return [name for name in names if name not in skip]

    # ---- loss --------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # `model` is the DDP-wrapped module: calling it (not self.model) keeps gradient sync correct.
        outputs = model(**inputs)
        store = self._loss_parts["train" if model.training else "eval"]
        for name, value in outputs["loss_parts"].items():
            store[name].append(value.detach().float())
        loss = outputs["loss"]
        if model.training and self.args.stop_on_nonfinite_loss:
            self._check_finite(outputs["loss_parts"], loss)
        return (loss, {"logits": outputs["logits"]}) if return_outputs else loss

    def _check_finite(self, parts: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """Raises :class:`NonFiniteLossError` naming the component(s), before the backward touches the weights.

        One device sync per step. Under several processes the flags are summed across ranks so that every rank
        stops together (one rank raising alone would leave the others waiting in DDP's all-reduce).
        """
        labels = [f"loss_{name}" for name in parts] + ["loss"]
        values = torch.stack([v.detach().float().reshape(()) for v in parts.values()] + [loss.detach().float()])
        local_bad = ~torch.isfinite(values)
        bad = local_bad.float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bool(bad.any()):
            return
        if bool(local_bad.any()):
            where = ", ".join(f"{n}={v:.4g}" for n, v, b in zip(labels, values.tolist(), local_bad.tolist()) if b)
        else:
            where = "on another process: " + ", ".join(n for n, b in zip(labels, bad.tolist()) if b)
        raise NonFiniteLossError(
            f"Non-finite loss at step {self.state.global_step + 1} (method {self.args.distill_method!r}): {where}. "
            "Training stopped before this step's update; the checkpoints already written are intact. "
            "Try a lower learning_rate, max_grad_norm (gradient clipping), bf16 instead of fp16, or check the "
            "inputs (NaN pixels, wrong normalisation); resume_from_checkpoint restarts from the last good checkpoint."
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of each loss component since the last log (``loss_ce``, ``eval_loss_kd``, ...)."""
        if "loss" in logs:
            self._merge_loss_parts(logs, "train", "")
        else:
            prefix = next((k[: -len("loss")] for k in logs if k.endswith("_loss") and k != "train_loss"), None)
            if prefix is not None:
                self._merge_loss_parts(logs, "eval", prefix)
        super().log(logs, start_time)

    def _merge_loss_parts(self, logs: dict[str, float], mode: str, prefix: str) -> None:
        store = self._loss_parts[mode]
        for name, values in sorted(store.items()):
            mean = torch.stack(values).mean()
            if self.accelerator.num_processes > 1:
                mean = self.accelerator.reduce(mean, reduction="mean")
            logs[f"{prefix}loss_{name}"] = round(mean.item(), 4)
        store.clear()

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        # predict() runs this loop without logging; start every evaluation with an empty buffer.
        self._loss_parts["eval"].clear()
        self._sync_buffers_from_main_process()
        return super().evaluation_loop(*args, **kwargs)

    def _sync_buffers_from_main_process(self) -> None:
        # DDP broadcasts rank 0's buffers at the start of each training forward, so after a step every other
        # rank holds its own update of the BatchNorm statistics (student and heads). Evaluation runs the
        # unwrapped model and the export saves rank 0's: give every rank rank 0's buffers, as DDP would.
        ddp = self.model_wrapped
        if self.accelerator.num_processes <= 1 or ddp is self.model or not getattr(ddp, "broadcast_buffers", False):
            return
        for buffer in self.accelerator.unwrap_model(ddp).buffers():
            torch.distributed.broadcast(buffer.data, src=0)

    # ---- train / resume ----------------------------------------------------------------------------------

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: Any = None,
        **kwargs: Any,
    ):
        """Trains; refuses an output_dir holding another run's checkpoints (see :meth:`manifest`)."""
        self._loss_parts["train"].clear()
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
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        self._sync_buffers_from_main_process()
        return output

    # ---- checkpoints: written under a temporary name, renamed when complete ------------------------------

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
        }

    def _check_manifest(self, checkpoint: str, resuming: bool = True) -> None:
        path = os.path.join(checkpoint, MANIFEST_NAME)
        if not os.path.isfile(path):
            if resuming and not os.path.isfile(os.path.join(checkpoint, SAFE_WEIGHTS_NAME)):
                raise ValueError(f"{checkpoint!r} is not a checkpoint folder (no {SAFE_WEIGHTS_NAME}).")
            raise ValueError(
                f"{checkpoint!r} was not written by pat_hf (no {MANIFEST_NAME}). "
                + ("Cannot resume from it." if resuming else "Use another output_dir, or move its checkpoints away.")
            )
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        current = self.manifest()
        diffs = []
        for key in ("method", "teacher", "student", "class_names"):
            a, b = saved.get(key), current.get(key)
            if key == "teacher" and a and b:
                a = {k: a.get(k) for k in ("architecture", "fingerprint", "revision")}
                b = {k: b.get(k) for k in ("architecture", "fingerprint", "revision")}
            if a != b:
                diffs.append(f"{key}: checkpoint {a} vs now {b}")
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
            wrapper.method.load_state_dict({k: v for k, v in saved.items() if not k.startswith(EXTRA_STATE_PREFIX)})
            wrapper.method.load_extra_state_tensors(extra)

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
        export_student(
            wrapper.student,
            output_dir,
            state_dict=student_sd,
            class_names=self.class_names,
            model_args=self.student_model_args,
            card=None if is_checkpoint else self.model_card_info(),
            image_processor=self.processing_class if is_transformers_model(wrapper.student) else None,
        )
        if is_checkpoint:
            extra = {EXTRA_STATE_PREFIX + k: v for k, v in wrapper.method.extra_state_tensors().items()}
            if method_sd or extra:
                from safetensors.torch import save_file

                tensors = {k: v.detach().cpu().contiguous().clone() for k, v in {**method_sd, **extra}.items()}
                save_file(tensors, os.path.join(output_dir, DISTILL_STATE_NAME), metadata={"format": "pt"})
            with open(os.path.join(output_dir, MANIFEST_NAME), "w", encoding="utf-8") as f:
                json.dump(self.manifest(), f, indent=2)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def model_card_info(self, model_name: str | None = None, dataset: str | None = None) -> ModelCardInfo:
        """Collects what the model card says: teacher, method settings, data, last evaluation metrics."""
        student = self.student
        metrics: dict[str, float] = {}
        for entry in self.state.log_history if self.state is not None else []:
            metrics.update({k: v for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))})
        metrics = {k: v for k, v in metrics.items() if not k.endswith(("_runtime", "_per_second", "_steps_per_second"))}
        args = self.args
        hyper = {
            "learning_rate": args.learning_rate,
            "train_batch_size (total)": args.per_device_train_batch_size
            * max(1, args.world_size)
            * args.gradient_accumulation_steps,
            "epochs": args.num_train_epochs,
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "seed": args.seed,
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        }
        arch = student.pretrained_cfg.get("architecture") if is_timm_model(student) else type(student).__name__
        return ModelCardInfo(
            model_name=model_name
            or (args.hub_model_id.split("/")[-1] if args.hub_model_id else None)
            or os.path.basename(os.path.normpath(args.output_dir)),
            student_architecture=str(arch),
            method_settings=self.method.settings(),
            teacher=self.teacher.describe() if self.teacher is not None else None,
            dataset=dataset or self.dataset_name,
            metrics=metrics,
            class_names=self.class_names,
            hyperparameters=hyper,
            repo_id=args.hub_model_id,
            library_name="timm" if is_timm_model(student) else "transformers",
        )

    def create_model_card(self, model_name: str | None = None, dataset: str | None = None, **kwargs: Any) -> None:
        """Writes README.md for the exported student (Trainer's version reads ``model.config``, which the
        wrapper lacks)."""
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(render_model_card(self.model_card_info(model_name=model_name, dataset=dataset)))

    # ---- Hub -----------------------------------------------------------------------------------------------
    # Trainer uploads all of output_dir but checkpoints (training_args.bin, logs, results, a processor saved
    # there); a pat_hf repo's root holds the student export alone, so each upload reads a snapshot of hard links
    # to hub_files() only. Checkpoints (hub_strategy="checkpoint" / "all_checkpoints") go to a subfolder, as in
    # Trainer, so that they can be downloaded and resumed. Snapshots also keep background uploads consistent
    # while checkpoints are renamed from their staging folder, rotated away, or written next to them.

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Creates the repo ``args.hub_model_id``; a refused token or namespace raises
        :class:`pat_hf.hub.HubPushError` saying what to change."""
        from huggingface_hub.errors import HfHubHTTPError

        from .hub import explain_push_error

        try:
            super().init_hf_repo(token=token, private=private)
        except HfHubHTTPError as err:
            repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
            raise explain_push_error(err, repo_id, token if token is not None else self.args.hub_token) from err

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Saves the student to ``output_dir`` and uploads it alone: ``config.json``, ``model.safetensors`` and
        ``README.md`` for a timm student (never the teacher, the method's heads or state, logs or checkpoints).

        Args:
            commit_message: Message of the commit.
            blocking: Wait for the upload; otherwise return a ``Future``.
            token: Token with write access; default ``args.hub_token``, then ``HF_TOKEN`` / ``hf auth login``.
            revision: Branch to commit to; default ``args.hub_revision`` (the default branch).
            private: Whether a repo created now is private; default ``args.hub_private_repo``.
            **kwargs: ``model_name`` and ``dataset`` for the model card.

        Returns:
            The ``CommitInfo`` (a ``Future`` of it when ``blocking=False``); None on processes other than the
            main one.

        Raises:
            pat_hf.hub.HubPushError: The Hub refused the token or the repo (HTTP 401/403/404); nothing was
                uploaded and the local export stays as saved.
        """
        from huggingface_hub.errors import HfHubHTTPError

        from .hub import explain_push_error, hub_files

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        # On every process: FSDP/DeepSpeed gather the weights collectively; only the main process writes.
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(model_name=kwargs.pop("model_name", None), dataset=kwargs.pop("dataset", None))
        self._finish_current_push()
        try:
            return self._upload_snapshot(
                self.args.output_dir,
                hub_files(self.student),
                repo_id=self.hub_model_id,
                commit_message=commit_message,
                token=token,
                run_as_future=not blocking,
                revision=revision if revision is not None else self.args.hub_revision,
            )
        except HfHubHTTPError as err:
            raise explain_push_error(err, self.hub_model_id, token) from err

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """As Trainer's: the repo root gets the checkpoint's student (plus a model card with the metrics so
        far); the whole checkpoint, method state and manifest included, goes to ``last-checkpoint/`` or
        ``checkpoint-N/`` only with ``hub_strategy="checkpoint"`` / ``"all_checkpoints"``."""
        import fnmatch

        from transformers.trainer_utils import HubStrategy, SaveStrategy
        from transformers.utils.hub import PushInProgress

        from .hub import hub_files

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        # As Trainer: skip this push while the previous one is still uploading, unless hub_always_push.
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        patterns = hub_files(self.student)
        # As Trainer, output_dir gets the checkpoint's student: copying it avoids gathering the weights again.
        for name in os.listdir(checkpoint_folder):
            if name != "README.md" and any(fnmatch.fnmatch(name, p) for p in patterns):
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        self.create_model_card()
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        common = {
            "repo_id": self.hub_model_id,
            "token": self.args.hub_token,
            "revision": self.args.hub_revision,
            "run_as_future": True,
        }
        jobs = [self._upload_snapshot(output_dir, patterns, commit_message=commit_message, **common)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            name = os.path.basename(os.path.normpath(checkpoint_folder))
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else name
            message = commit_message + ", checkpoint"
            jobs.append(
                self._upload_snapshot(
                    checkpoint_folder, None, path_in_repo=path_in_repo, commit_message=message, **common
                )
            )
        for job in jobs:
            job.add_done_callback(self._warn_failed_push)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def _upload_snapshot(self, folder: str, patterns: list[str] | None, *, run_as_future: bool, **kwargs: Any) -> Any:
        """``upload_folder`` of a hard-link snapshot of ``folder`` (its top-level files matching ``patterns``, or
        everything), removed once uploaded."""
        snapshot = _link_snapshot(folder, os.path.join(self.args.output_dir, HUB_SNAPSHOT_PREFIX), patterns)
        try:
            result = self._hf_api().upload_folder(folder_path=snapshot, run_as_future=run_as_future, **kwargs)
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        if run_as_future:
            result.add_done_callback(lambda _: shutil.rmtree(snapshot, ignore_errors=True))
        else:
            shutil.rmtree(snapshot, ignore_errors=True)
        return result

    def _warn_failed_push(self, job: Any) -> None:
        # Trainer waits for background pushes without looking at their outcome; a failed one would go unnoticed.
        from huggingface_hub.errors import HfHubHTTPError

        from .hub import explain_push_error

        err = None if job.cancelled() else job.exception()
        if isinstance(err, HfHubHTTPError):
            err = explain_push_error(err, self.hub_model_id, self.args.hub_token)
        if err is not None:
            logger.warning("A push to the Hub failed (training goes on): %s", err)

    def _hf_api(self) -> Any:
        # One client per trainer: its single worker thread keeps background commits in submission order.
        api = getattr(self, "_hub_api", None)
        if api is None:
            from huggingface_hub import HfApi

            api = self._hub_api = HfApi(library_name="pat_hf", library_version=__version__)
        return api


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


HUB_SNAPSHOT_PREFIX = "_hub-push-"


def _link_snapshot(folder: str, prefix: str, patterns: list[str] | None = None) -> str:
    """A new folder named ``prefix...`` holding hard links (copies across devices) to ``folder``'s files: all of
    them, or only its top-level files matching ``patterns``."""
    import fnmatch
    import tempfile

    snapshot = tempfile.mkdtemp(prefix=os.path.basename(prefix), dir=os.path.dirname(prefix))
    for root, _, files in os.walk(folder):
        relative = os.path.relpath(root, folder)
        if patterns is not None and relative != ".":
            continue
        os.makedirs(os.path.join(snapshot, relative), exist_ok=True)
        for name in files:
            if patterns is not None and not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            source, target = os.path.join(root, name), os.path.join(snapshot, relative, name)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
    return snapshot


def load_student_weights(student: nn.Module, directory: str) -> None:
    """Loads an exported student's weights (timm layout or ``save_pretrained``) into ``student``."""
    from safetensors.torch import load_file

    path = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} holds no {SAFE_WEIGHTS_NAME}; it is not a pat_hf export or checkpoint.")
    state = load_file(path)
    if is_transformers_model(student):
        result = student.load_state_dict(state, strict=False)
        tied = set(getattr(student, "_tied_weights_keys", None) or [])
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"Weights in {directory!r} do not fit the student: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}."
            )
    else:
        student.load_state_dict(state, strict=True)
