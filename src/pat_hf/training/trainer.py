"""``PATDistillationTrainer``: transformers' Trainer for distilling an image classifier into a timm student.

This file keeps the training loop's own concerns: the loss and the logging of its parts, the decay groups, the
evaluation loop and the buffer sync. Construction is :func:`pat_hf.training.modeling.build_distillation_model`;
checkpoints (every override of a private Trainer method) are :class:`pat_hf.training.checkpointing.CheckpointMixin`;
the model card and Hub push are :class:`pat_hf.training.hub_push.HubPushMixin`; Mixup / CutMix, model EMA and timm schedules
are :class:`pat_hf.training.recipe_mixin.RecipeMixin`; ``torch_compile`` by regions is :class:`pat_hf.models.compile.CompileMixin`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..data.dataset_shapes import check_prepared, check_split, is_iterable_dataset
from ..data.datasets import PerSampleSeededDataset, collate_images, prepared_info, prepared_views
from ..errors import DivergedLossError, NonFiniteLossError
from ..metrics import build_compute_metrics
from ..models.compile import CompileMixin
from ..models.student import student_num_classes, student_source
from ..models.teacher import Teacher
from .checkpointing import CheckpointMixin
from .configuration import PATTrainingArguments
from .hub_push import HubPushMixin
from .loss_guard import LossGuard
from .modeling import build_distillation_model, resolve_teacher
from .output_dir import RunLock, check_output_dir, source_dirs
from .progress_check import StudentGradientCallback, StudentUnchangedError, parameter_fingerprint, why_unchanged
from .recipe_mixin import RecipeMixin
from .run_checks import check_batch_fits, check_student_is_classifier, check_teacher_input, check_two_models
from .validation import check_dataset_labels

logger = logging.getLogger(__name__)

__all__ = ["DivergedLossError", "NonFiniteLossError", "PATDistillationTrainer", "StudentUnchangedError"]


def single_process_loading_warning(num_workers: int, device_type: str) -> str | None:
    """The warning for a GPU run that loads its data in the training process (``dataloader_num_workers=0``)."""
    if num_workers or device_type != "cuda":
        return None
    return (
        "dataloader_num_workers=0 on a GPU: images are decoded and augmented in the training process, between "
        "steps, which usually leaves the GPU waiting. Set --dataloader_num_workers (about the number of CPU cores "
        "per GPU; docs/benchmarks.md says how many a step rate needs)."
    )


class _AugmentationEpoch(TrainerCallback):
    """Tells a :class:`~pat_hf.data.PerSampleSeededDataset` the epoch at the start of each epoch: accelerate's
    ``set_epoch`` reaches the dataset only when no sampler takes it (not under DDP's sharded sampler)."""

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        dataset = getattr(kwargs.get("train_dataloader"), "dataset", None)
        if isinstance(dataset, PerSampleSeededDataset):
            # state.epoch is the progress so far: an integer at an epoch start, a fraction when resuming mid-epoch.
            dataset.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))


class PATDistillationTrainer(CompileMixin, HubPushMixin, CheckpointMixin, RecipeMixin, Trainer):
    """Trainer that distils a frozen transformers teacher into a timm student.

    The student and the method's trainable heads form one wrapper module (what Trainer optimises, DDP-wraps
    and checkpoints). The teacher stays outside it: frozen, in eval mode, on the training device, under the
    same autocast. ``save_model()`` exports the student alone in timm's Hub layout; ``checkpoint-N/`` folders
    also hold the method's state and a manifest that resume checks.

    Args:
        model: The student: a timm ``nn.Module`` (or ``torch.compile`` of one), or a timm name / ``hf-hub:`` / ``local-dir:`` id created with
            as many classes as the dataset has. A transformers image classifier also works (to train teachers
            with ``distill_method="none"``).
        teacher: A transformers image classifier, a Hub id / local path for ``AutoModelForImageClassification``,
            or a :class:`pat_hf.Teacher` from :func:`pat_hf.load_teacher`. Required unless the method is ``none``.
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

    Raises:
        ValueError: (subclasses from :mod:`pat_hf.errors`) before anything is trained: a teacher that cannot be
            loaded, labels of the wrong type or range, an empty dataset, views that disagree, classes that do not
            match, an ``output_dir`` inside a model's source folder. ``train()`` adds the output-folder and
            checkpoint checks; see docs/reliability.md.

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
        # Before anything is built: one split each (not a DatasetDict), the teacher (checked against the view the
        # data was prepared with), then the labels (type and range, from the label column alone; they may name the
        # classes).
        check_split(train_dataset, "training dataset")
        check_split(eval_dataset, "evaluation dataset")
        if is_iterable_dataset(train_dataset) and args.max_steps <= 0:
            raise ValueError(
                "The training dataset is an IterableDataset (streaming), which has no length: set max_steps "
                "(--max_steps), the number of optimizer steps to train, instead of num_train_epochs."
            )
        check_batch_fits(train_dataset, args.per_device_train_batch_size, args.dataloader_drop_last, args.world_size)
        check_batch_fits(
            eval_dataset, args.per_device_eval_batch_size, args.dataloader_drop_last, args.world_size, "evaluation"
        )
        if isinstance(model, nn.Module):
            check_student_is_classifier(model)
            # Before the teacher is frozen: a student that is (or shares weights with) the teacher is refused first.
            check_two_models(model, teacher.model if isinstance(teacher, Teacher) else teacher)
        views = prepared_views(train_dataset, eval_dataset)
        teacher = resolve_teacher(
            args,
            teacher,
            view=views["teacher"],
            image_processor=teacher_image_processor,
            revision=teacher_revision,
            trust_remote_code=trust_remote_code,
        )
        if teacher is not None:
            check_teacher_input(teacher.model)
        class_names = check_dataset_labels(
            train_dataset,
            eval_dataset,
            class_names=class_names,
            teacher=teacher,
            num_classes=student_num_classes(model) if isinstance(model, nn.Module) else None,
        )
        wrapper = build_distillation_model(
            args,
            model,
            teacher,
            class_names=class_names,
            student_model_args=student_model_args,
            processing_class=processing_class,
            data_views=views,
        )
        # pat_hf never writes into the teacher's or the student's own folder, nor the Hub cache.
        self._protected_dirs = source_dirs(
            teacher.source_dir if teacher is not None else None,
            teacher.name_or_path if teacher is not None else None,
            student_source(wrapper.student),
        )
        check_output_dir(args.output_dir, protected=self._protected_dirs, overwrite=True)
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
        # torch_compile: the methods compile their regions; Accelerate compiles nothing (pat_hf.models.compile).
        self._compile_regions()
        if self.teacher is not None:
            # The teacher always runs inside the prepared wrapper's forward, so it inherits its autocast; it only
            # needs to live on this process's device.
            self.teacher.to(self.args.device)
        self._loss_guard = LossGuard(self.args, self.accelerator)
        # A loss that does not depend on the student stops the run within its first optimizer steps (progress_check).
        self.add_callback(StudentGradientCallback(self.args))
        self._loss_parts: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        num_classes = len(self.class_names) if self.class_names else student_num_classes(wrapper.student)
        self._setup_recipe(num_classes, wrapper.method.label_smoothing)
        self.add_callback(_AugmentationEpoch())
        self._warn_single_process_loading()

    # ---- convenience -------------------------------------------------------------------------------------

    @property
    def student(self) -> nn.Module:
        """The student being trained (unwrapped)."""
        return self.accelerator.unwrap_model(self.model).student

    @property
    def augmentation(self) -> Any:
        """The training data's :class:`~pat_hf.data.augment.AugmentationConfig` (None for data not prepared by
        :func:`pat_hf.with_image_transforms`)."""
        return (prepared_info(self.train_dataset) or {}).get("augmentation")

    @property
    def method(self) -> nn.Module:
        """The distillation method module (with its heads)."""
        return self.accelerator.unwrap_model(self.model).method

    # ---- optimizer -----------------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """As timm: no weight decay for 1-D parameters (norm weights, biases) and scalars (PAT's beta) of the
        student AND the method's heads, and for what a timm student lists in ``no_weight_decay()`` (position
        embeddings, cls tokens)."""
        names = super().get_decay_parameter_names(model)
        skip = {name for name, p in model.named_parameters() if p.ndim <= 1}
        student = getattr(model, "student", None)
        if student is not None and hasattr(student, "no_weight_decay"):
            skip |= {f"student.{name}" for name in student.no_weight_decay()}
        return [name for name in names if name not in skip]

    # ---- data ------------------------------------------------------------------------------------------------

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """Trainer's loader; training data prepared by :func:`pat_hf.with_image_transforms` with per-sample seeding
        (the default) is read through :class:`~pat_hf.data.PerSampleSeededDataset`, so every sample's augmentation
        is drawn from (``seed``, epoch, sample index) whatever the worker count or the resume point. A streamed
        dataset has no sample index to seed from: it is read as it streams (docs/reliability.md)."""
        augmentation = self.augmentation
        if augmentation is None or not augmentation.per_sample_seed or is_iterable_dataset(self.train_dataset):
            return super().get_train_dataloader()
        original = self.train_dataset
        # Trainer builds its loader (sampler, workers, accelerate's sharding) from self.train_dataset.
        self.train_dataset = PerSampleSeededDataset(original, self.args.seed)
        try:
            return super().get_train_dataloader()
        finally:
            self.train_dataset = original

    def _warn_single_process_loading(self) -> None:
        message = single_process_loading_warning(self.args.dataloader_num_workers, self.args.device.type)
        if message:
            logger.warning(message)

    # ---- loss --------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Each model's view from the uint8 batch, on the device (resize, normalisation, random erasing), before
        # Mixup / CutMix; float batches built by hand pass through.
        inputs = self.accelerator.unwrap_model(model).make_views(inputs)
        if model.training:
            # Schedules of the loss (DKD's warm-up) follow the trainer state, so resuming restores them exactly.
            self.method.set_progress(float(self.state.epoch or 0.0))
            # Mixup / CutMix of both views on the device (RecipeMixin); evaluation never mixes.
            inputs = self.mix_batch(inputs)
        # `model` is the DDP-wrapped module: calling it (not self.model) keeps gradient sync correct.
        outputs = model(**inputs)
        store = self._loss_parts["train" if model.training else "eval"]
        for name, value in outputs["loss_parts"].items():
            store[name].append(value.detach().float())
        loss = outputs["loss"]
        if model.training:  # NaN / infinite / diverging: stop before the backward touches the weights
            self._loss_guard.check(outputs["loss_parts"], loss, self.state.global_step + 1)
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
        """Trains, after the checks that need the output folder: not a model's source folder, no foreign files,
        no other run training there (``pat_hf_run.lock``), checkpoints and marker of this same run; then resumes
        from the checkpoint asked for (``True``: the newest complete one)."""
        self._loss_parts["train"].clear()
        self._loss_guard.reset()
        if self.data_collator is collate_images:  # raw images would fail at the first batch (KeyError)
            check_prepared(self.train_dataset, "training", prepared_info(self.train_dataset))
            if not isinstance(self.eval_dataset, dict):
                check_prepared(self.eval_dataset, "evaluation", prepared_info(self.eval_dataset))
        run_dir = self.args.output_dir
        check_output_dir(run_dir, protected=self._protected_dirs, overwrite=self.args.overwrite_output_dir)
        lock = RunLock(run_dir, owner=self.is_world_process_zero())
        lock.check()
        self.accelerator.wait_for_everyone()
        lock.acquire()
        try:
            resume = self._check_checkpoints_before_train(resume_from_checkpoint)
            if not any(p.requires_grad for p in self.student.parameters()):
                raise StudentUnchangedError(
                    "The student has no trainable parameter (every one has requires_grad=False): training cannot "
                    "change it. Unfreeze the parameters to train (student.requires_grad_(True))."
                )
            self._student_fingerprint = parameter_fingerprint(self.student)  # a resume replaces it once loaded
            start_step = _checkpoint_step(resume)
            self._claim_output_dir(run_dir)
            output = super().train(
                resume_from_checkpoint=resume, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
            )
        finally:
            lock.release()
        self._sync_buffers_from_main_process()
        # Nothing exported as distilled unless the student changed (the settings that train nothing are refused
        # earlier; this is what slips through: a warm-up still at 0, a custom optimizer without the student). A
        # run resumed at its last step trains nothing more, and its weights come out of training already.
        ran = self.state.global_step > start_step
        self._student_unchanged = ran and torch.equal(self._student_fingerprint, parameter_fingerprint(self.student))
        if self._student_unchanged:
            logger.warning(
                "TRAINING DID NOT CHANGE THE STUDENT: %d steps ran but its weights are the ones it started with (%s). "
                "Its model card will say that it is not trained.",
                self.state.global_step - start_step,
                why_unchanged(self.args),
            )
        return output


def _checkpoint_step(checkpoint: str | None) -> int:
    """The global step a resumed run starts from (its trainer_state.json), 0 without a checkpoint."""
    if not checkpoint:
        return 0
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f).get("global_step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0
