"""One run of the study: the models, the training arguments, training a teacher or a student, scoring it, and
the checks recorded with it (the teacher on the students' view, what PAT's prompts do to the teacher)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pat_hf.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, TensorBatchCollator

from .config import (
    IMAGE_SIZE,
    PAIRS,
    STUDENT_CROP_PAD,
    STUDENT_RECIPES,
    STUDENT_TRAINING_RECIPES,
    TEACHER_CROP_PAD,
    TEACHER_RECIPES,
    StudyConfig,
    pair_and_recipe,
)
from .data import AugmentingCollator, FashionTensors, StudyData

if TYPE_CHECKING:
    from .runs import RunSpec


def _view_overlay() -> dict[str, Any]:
    return {"mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD, "crop_pct": 1.0, "interpolation": "bilinear"}


def build_teacher(name: str, **overrides: Any) -> tuple[torch.nn.Module, Any]:
    """A randomly initialised teacher of the study and its image processor (32 px, Fashion-MNIST statistics);
    ``overrides`` replace entries of its recipe (candidate shapes in ``benchmarks/vit_teacher_sweep.py``)."""
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    recipe = {k: v for k, v in {**TEACHER_RECIPES[name], **overrides}.items() if k != "architecture"}
    labels = {
        "num_labels": len(FASHION_MNIST_CLASSES),
        "id2label": dict(enumerate(FASHION_MNIST_CLASSES)),
        "label2id": {n: i for i, n in enumerate(FASHION_MNIST_CLASSES)},
    }
    if name == "vit":
        model = ViTForImageClassification(ViTConfig(**recipe, **labels))
    elif name == "convnext":
        model = ConvNextForImageClassification(
            ConvNextConfig(num_channels=3, **{k: v for k, v in recipe.items() if k != "image_size"}, **labels)
        )
    else:
        raise ValueError(f"Unknown teacher {name!r}; the study has {list(TEACHER_RECIPES)}.")
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(FASHION_MNIST_MEAN),
        image_std=list(FASHION_MNIST_STD),
    )
    return model, processor


def build_student(name: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A randomly initialised timm student of the study and the arguments it was created with."""
    from pat_hf.models.student import create_student

    recipe = dict(STUDENT_RECIPES[name])
    arch = recipe.pop("name")
    model = create_student(
        arch, num_classes=len(FASHION_MNIST_CLASSES), pretrained_cfg_overlay=_view_overlay(), **recipe
    )
    # What timm actually took: a CNN has no img_size argument (the size only goes to its pretrained_cfg).
    return model, dict(getattr(model, "pat_hf_model_args", recipe))


def count_params(model: torch.nn.Module) -> int:
    """Parameters of a model."""
    return sum(p.numel() for p in model.parameters())


def _training_args(
    config: StudyConfig, output_dir: str, *, epochs: int, batch_size: int, lr: float, seed: int, **kw: Any
) -> Any:
    """The PATTrainingArguments shared by every run: AdamW, cosine schedule, no checkpoints, bf16 on cuda."""
    from pat_hf.training.configuration import PATTrainingArguments

    device = config.resolved_device()
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=512,
        learning_rate=lr,
        weight_decay=config.weight_decay,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        logging_steps=config.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        dataloader_num_workers=config.workers,
        dataloader_pin_memory=device == "cuda",
        disable_tqdm=True,
        eval_teacher_losses=False,
    )
    values.update(kw)
    return PATTrainingArguments(**values)


def _loss_curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """The logged training losses (total and parts) every ``logging_steps`` steps."""
    curve = []
    for entry in log_history:
        if "loss" in entry and "eval_loss" not in entry:
            point = {"step": entry.get("step"), "epoch": round(float(entry.get("epoch", 0.0)), 3)}
            point.update({k: v for k, v in entry.items() if k in ("loss", "grad_norm") or k.startswith("loss_")})
            curve.append(point)
    return curve


def _curve_summary(curve: list[dict[str, float]]) -> dict[str, Any]:
    """First and last logged values of every loss part, and whether any logged value was not finite."""
    keys = sorted({k for point in curve for k in point if k == "loss" or k.startswith("loss_")})
    summary: dict[str, Any] = {"non_finite": False}
    for key in keys:
        values = [float(p[key]) for p in curve if key in p]
        if any(not math.isfinite(v) for v in values):
            summary["non_finite"] = True
        summary[key] = {"first": values[0], "last": values[-1]} if values else None
    return summary


def _limit(indices: np.ndarray, limit: int | None) -> np.ndarray:
    if limit is None or limit >= len(indices):
        return indices
    # Every k-th index keeps the limited set spread over the (sorted, class-balanced) split.
    return indices[np.linspace(0, len(indices) - 1, limit).astype(np.int64)]


def top1_metrics(eval_pred: Any) -> dict[str, float]:
    """Top-1 accuracy of the student's logits.

    The study computes it directly rather than through pat_hf's `evaluate` metric so that it needs neither
    `evaluate` nor `datasets` (a bare GPU image has torch, transformers, timm and accelerate only).
    """
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}


def _evaluate(trainer: Any, dataset: FashionTensors) -> tuple[float, float | None]:
    """Top-1 of the student's weights and, with a model EMA, of the EMA's."""
    metrics = trainer.evaluate(dataset, metric_key_prefix="test")
    ema = metrics.get("test_ema_accuracy")
    return float(metrics["test_accuracy"]), None if ema is None else float(ema)


def student_collator(recipe: str) -> Any:
    """The students' batch maker of a training recipe (``STUDENT_TRAINING_RECIPES``)."""
    auto_augment = STUDENT_TRAINING_RECIPES[recipe].get("auto_augment")
    if auto_augment:
        return AugmentingCollator(auto_augment, IMAGE_SIZE, FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0])
    return TensorBatchCollator(pad=STUDENT_CROP_PAD, image_size=IMAGE_SIZE)


def _teacher_dir(config: StudyConfig, name: str) -> str:
    return os.path.join(config.output_dir, "teachers", name)


def _train_teacher(config: StudyConfig, spec: RunSpec, data: StudyData, settings: dict[str, Any]) -> dict[str, Any]:
    from pat_hf.training.trainer import PATDistillationTrainer

    path = _teacher_dir(config, spec.name)
    work_dir = path + ".partial"
    torch.manual_seed(0)
    model, processor = build_teacher(spec.name)
    train_idx = _limit(np.arange(len(data.train_labels)), config.max_train_images)
    args = _training_args(
        config,
        work_dir,
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=config.teacher_lr,
        seed=0,
        distill_method="none",
        eval_strategy="epoch",
    )
    trainer = PATDistillationTrainer(
        model=model,
        args=args,
        data_collator=TensorBatchCollator(pad=TEACHER_CROP_PAD[spec.name], image_size=IMAGE_SIZE),
        train_dataset=FashionTensors(data.train_images, data.train_labels, train_idx, augment=True),
        # Scored on the validation split after every epoch: the JSON keeps the teacher's learning curve.
        eval_dataset=FashionTensors(data.train_images, data.train_labels, _limit(data.val, config.max_eval_images)),
        processing_class=processor,
        compute_metrics=top1_metrics,
        class_names=FASHION_MNIST_CLASSES,
    )
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start
    result = _score(config, trainer, data)
    trainer.save_model(work_dir)
    # Publish atomically, as the demo's teacher cache: a half-written teacher is never picked up.
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(work_dir, path)
    curve = _loss_curve(trainer.state.log_history)
    return {
        **result,
        "train_seconds": train_seconds,
        "train_images": len(train_idx),
        "params": count_params(model),
        "steps": trainer.state.global_step,
        "model_dir": path,
        "val_curve": [
            {"epoch": round(float(e["epoch"]), 3), "val_top1": e["eval_accuracy"]}
            for e in trainer.state.log_history
            if "eval_accuracy" in e
        ],
        "loss_curve": curve,
        "loss_summary": _curve_summary(curve),
    }


def _score(config: StudyConfig, trainer: Any, data: StudyData) -> dict[str, Any]:
    """Validation and test top-1. With a model EMA the EMA's weights are the run's result (``val_top1`` /
    ``test_top1``: what the export holds), the raw student's are kept beside them (``*_raw``)."""
    val_idx = _limit(data.val, config.max_eval_images)
    test_idx = _limit(np.arange(len(data.test_labels)), config.max_eval_images)
    start = time.time()
    val, val_ema = _evaluate(trainer, FashionTensors(data.train_images, data.train_labels, val_idx))
    test, test_ema = _evaluate(trainer, FashionTensors(data.test_images, data.test_labels, test_idx))
    result = {
        "val_top1": val if val_ema is None else val_ema,
        "test_top1": test if test_ema is None else test_ema,
        "val_images": len(val_idx),
        "test_images": len(test_idx),
        "eval_seconds": time.time() - start,
    }
    if val_ema is not None:
        result.update(val_top1_raw=val, test_top1_raw=test, scored_weights="ema")
    return result


def _train_student(config: StudyConfig, spec: RunSpec, data: StudyData, settings: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from pat_hf.training.trainer import PATDistillationTrainer

    pair, recipe = pair_and_recipe(spec.name)
    teacher_name, student_name = PAIRS[pair]
    method = settings["method"]
    teacher = processor = None
    if method != "none":
        teacher_path = _teacher_dir(config, teacher_name)
        teacher = AutoModelForImageClassification.from_pretrained(teacher_path)
        processor = AutoImageProcessor.from_pretrained(teacher_path)
    # The seed fixes the student's initialisation and the heads' (built inside the trainer), then the data order.
    torch.manual_seed(spec.seed)
    student, student_args = build_student(student_name)
    train_idx = _limit(data.subset, config.max_train_images)
    run_dir = os.path.join(config.output_dir, "work", spec.run_id)
    args = _training_args(
        config,
        run_dir,
        epochs=config.student_epochs,
        batch_size=config.student_batch_size,
        lr=config.student_lr,
        seed=spec.seed,
        distill_method=method,
        **settings["method_args"],
        **{k: v for k, v in settings["recipe_args"].items() if k != "auto_augment"},
    )
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        data_collator=student_collator(recipe),
        train_dataset=FashionTensors(data.train_images, data.train_labels, train_idx, augment=True),
        compute_metrics=top1_metrics,
        class_names=FASHION_MNIST_CLASSES,
        teacher_image_processor=processor,
        student_model_args=student_args,
        dataset_name="fashion_mnist",
    )
    heads = count_params(trainer.method)
    teacher_view_top1 = _teacher_top1_on_training_view(teacher, data, train_idx, spec.seed, recipe) if teacher else None
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start
    result = _score(config, trainer, data)
    curve = _loss_curve(trainer.state.log_history)
    effect = _prompt_effect(config, trainer, student, data, train_idx, spec.seed, recipe) if method == "pat" else None
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        **result,
        "train_seconds": train_seconds,
        "train_images": len(train_idx),
        "params": count_params(student),
        "method_head_params": heads,
        "teacher_top1_on_training_view": teacher_view_top1,
        "method_settings": trainer.method.settings(),
        "steps": trainer.state.global_step,
        "loss_curve": curve,
        "loss_summary": _curve_summary(curve),
        "prompt_effect": effect,
    }


PROMPT_EFFECT_BATCHES = 8
"""Batches of the student's training view on which a finished PAT run's prompts are examined."""


def _prompt_effect(
    config: StudyConfig,
    trainer: Any,
    student: torch.nn.Module,
    data: StudyData,
    indices: np.ndarray,
    seed: int,
    recipe: str = "flips",
) -> dict[str, Any] | None:
    """What the trained prompts do to the teacher on the student's training view (batches of the training
    batch size, each seeing the previous one's feedback): are the teacher features the prompts produce
    different from the plain teacher's, and is the prompted teacher still right?"""
    from pat_hf.methods.base import DistillationBatch

    size = config.student_batch_size
    # Full batches only: a smaller one would get no feedback (as in training).
    views = _training_view_batches(data, indices[: PROMPT_EFFECT_BATCHES * size], seed, size, recipe)
    device = next(student.parameters()).device
    batches = []
    for view in views:
        if len(view["labels"]) == size:
            pixels = view["pixel_values"].to(device)
            batches.append(DistillationBatch(pixel_values=pixels, labels=view["labels"], teacher_pixel_values=pixels))
    if not batches:
        return None
    effect = trainer.method.prompt_effect(student, trainer.teacher, batches)
    # The JSON form (string stage keys), so that a fresh record equals the one read back from its file.
    return json.loads(json.dumps(effect))


@torch.no_grad()
def _teacher_top1_on_training_view(
    teacher: torch.nn.Module, data: StudyData, indices: np.ndarray, seed: int, recipe: str = "flips"
) -> float:
    """The teacher's top-1 on the student's training images as the student sees them (one augmented draw, before
    any mixing): a teacher that is wrong on these views distils its mistakes, whatever the method."""
    device = next(teacher.parameters()).device
    correct = 0
    teacher.eval()
    for batch in _training_view_batches(data, indices, seed, 512, recipe):
        logits = teacher(pixel_values=batch["pixel_values"].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
    return correct / max(len(indices), 1)


def _training_view_batches(
    data: StudyData, indices: np.ndarray, seed: int, size: int, recipe: str = "flips"
) -> list[dict[str, Any]]:
    """The images at ``indices`` as the students see them in training (one augmented draw, seeded), in batches
    of ``size``; the global RNGs are restored, so a run draws the same numbers as without these checks."""
    import random

    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    torch.manual_seed(seed)
    random.seed(seed)
    collator = student_collator(recipe)
    dataset = FashionTensors(data.train_images, data.train_labels, indices, augment=True)
    try:
        return [
            collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            for start in range(0, len(dataset), size)
        ]
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
