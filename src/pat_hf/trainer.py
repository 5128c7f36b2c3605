"""``PATDistillationTrainer``: transformers' Trainer for distilling an image classifier into a timm student.

This file keeps the training loop's own concerns: the loss and the logging of its parts, the decay groups, the
evaluation loop and the buffer sync. Construction is :func:`pat_hf.modeling.build_distillation_model`;
checkpoints (every override of a private Trainer method) are :class:`pat_hf.checkpointing.CheckpointMixin`;
the model card and Hub push are :class:`pat_hf.hub_push.HubPushMixin`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from .checkpointing import CheckpointMixin
from .compile import CompileMixin
from .configuration import PATTrainingArguments
from .data import collate_images, dataset_class_names
from .errors import NonFiniteLossError
from .hub_push import HubPushMixin
from .metrics import build_compute_metrics
from .modeling import build_distillation_model
from .teacher import Teacher

__all__ = ["NonFiniteLossError", "PATDistillationTrainer"]


class PATDistillationTrainer(CompileMixin, HubPushMixin, CheckpointMixin, Trainer):
    """Trainer that distils a frozen transformers teacher into a timm student.

    The student and the method's trainable heads form one wrapper module (what Trainer optimises, DDP-wraps
    and checkpoints). The teacher stays outside it: frozen, in eval mode, on the training device, under the
    same autocast. ``save_model()`` exports the student alone in timm's Hub layout; ``checkpoint-N/`` folders
    also hold the method's state and a manifest that resume checks.

    Args:
        model: The student: a timm ``nn.Module`` (or ``torch.compile`` of one), or a timm name / ``hf-hub:`` / ``local-dir:`` id created with
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
        # Classes: the dataset's names (ClassLabel) define the label space everything is matched to.
        if class_names is None:
            class_names = dataset_class_names(train_dataset) or dataset_class_names(eval_dataset)
        wrapper = build_distillation_model(
            args,
            model,
            teacher,
            class_names=class_names,
            teacher_image_processor=teacher_image_processor,
            teacher_revision=teacher_revision,
            trust_remote_code=trust_remote_code,
            student_model_args=student_model_args,
            processing_class=processing_class,
        )
        self.teacher: Teacher | None = wrapper.teacher
        self.class_names: list[str] | None = wrapper.class_names
        self.student_model_args = wrapper.student_model_args
        self.dataset_name = dataset_name
        super().__init__(
            model=wrapper,
            args=args,
            data_collator=data_collator if data_collator is not None else collate_images,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics if compute_metrics is not None else build_compute_metrics(),
            **kwargs,
        )
        # The loss is a per-batch mean: Trainer must divide it by the accumulation steps (see DistillationModel).
        self.loss_is_scaled_for_ga = False
        # torch_compile: the methods compile their regions; Accelerate compiles nothing (pat_hf.compile).
        self._compile_regions()
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

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: Any = None,
        **kwargs: Any,
    ):
        """Trains; refuses an output_dir holding another run's checkpoints (see :meth:`manifest`)."""
        self._loss_parts["train"].clear()
        self._check_checkpoints_before_train(resume_from_checkpoint)
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        self._sync_buffers_from_main_process()
        return output
