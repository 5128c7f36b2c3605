"""``PATDistillationTrainer``: transformers' Trainer for distilling an image classifier into a timm student."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

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
        return (loss, {"logits": outputs["logits"]}) if return_outputs else loss

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
        return super().evaluation_loop(*args, **kwargs)

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
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

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
            model_name=model_name or os.path.basename(os.path.normpath(args.output_dir)),
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
