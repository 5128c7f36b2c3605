"""The built-in demo: distil a transformers CNN teacher into a timm ResNet student on real Fashion-MNIST.

``make demo`` (or ``python -m pat_hf.demo``) runs it:

1. trains a small transformers ResNet teacher on the full 60,000-image training set (once; cached),
2. trains a small timm ResNet student (resnet10t) from scratch on a class-balanced subset (the low-data regime where a
   teacher matters),
3. distils the teacher into the same student on the same subset,
4. prints teacher, scratch student and distilled student side by side: test accuracy on the 10,000 test
   images, parameters and training time, and leaves the exported student on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from .data.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, balanced_subset

__all__ = ["DemoConfig", "ensure_teacher", "main", "run_demo"]

logger = logging.getLogger(__name__)

TEACHER_RECIPE = {
    "architecture": "ResNetForImageClassification",
    "embedding_size": 32,
    "hidden_sizes": [32, 64, 128, 256],
    "depths": [1, 1, 1, 1],
    "image_size": 28,
    "epochs": 4,
    "learning_rate": 2e-3,
    "batch_size": 128,
    "seed": 0,
}
STUDENT_ARGS = {
    "name": "resnet10t",
    "img_size": 28,
    "stem_width": 16,
    "channels": (16, 32, 64, 128),
}


@dataclass
class DemoConfig:
    """Settings of the demo (the defaults finish in well under 15 minutes on 2 CPU cores)."""

    output_dir: str = "outputs/demo"
    cache_dir: str = ".cache/pat_hf"
    train_subset: int = 2000
    student_epochs: int = 60
    batch_size: int = 64
    learning_rate: float = 1e-3
    seed: int = 0
    max_test_samples: int | None = None
    teacher_epochs: int = TEACHER_RECIPE["epochs"]


def _teacher_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True,
        size={"height": TEACHER_RECIPE["image_size"], "width": TEACHER_RECIPE["image_size"]},
        image_mean=list(FASHION_MNIST_MEAN),
        image_std=list(FASHION_MNIST_STD),
    )


def ensure_teacher(cache_dir: str = ".cache/pat_hf", epochs: int | None = None, train_dataset: Any = None) -> str:
    """Returns the folder of the demo teacher, training it first if it is not cached.

    The teacher is a transformers ``ResNetForImageClassification`` trained with ``distill_method="none"`` on
    the full Fashion-MNIST training set; the folder loads with ``AutoModelForImageClassification`` and
    ``AutoImageProcessor``.
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    from .data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist, with_image_transforms
    from .data.views import ImageView
    from .training.configuration import PATTrainingArguments
    from .training.trainer import PATDistillationTrainer

    recipe = dict(TEACHER_RECIPE, epochs=epochs or TEACHER_RECIPE["epochs"])
    tag = "fashion-mnist-resnet{width}-e{epochs}-s{seed}".format(width=recipe["hidden_sizes"][-1], **recipe)
    path = os.path.join(cache_dir, tag)
    if os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(os.path.join(path, "recipe.json")):
        return path
    print(f"Training the demo teacher on the full Fashion-MNIST training set (cached in {path}) ...", flush=True)
    config = ResNetConfig(
        embedding_size=recipe["embedding_size"],
        hidden_sizes=recipe["hidden_sizes"],
        depths=recipe["depths"],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=len(FASHION_MNIST_CLASSES),
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={n: i for i, n in enumerate(FASHION_MNIST_CLASSES)},
    )
    model = ResNetForImageClassification(config)
    processor = _teacher_processor()
    view = ImageView.from_image_processor(processor)
    train = train_dataset if train_dataset is not None else load_fashion_mnist("train")
    work_dir = path + ".partial"
    args = PATTrainingArguments(
        output_dir=work_dir,
        distill_method="none",
        num_train_epochs=recipe["epochs"],
        per_device_train_batch_size=recipe["batch_size"],
        learning_rate=recipe["learning_rate"],
        weight_decay=0.05,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        seed=recipe["seed"],
        use_cpu=True,
    )
    trainer = PATDistillationTrainer(
        model=model,
        args=args,
        # per_sample_seed=False: the process's generators, as when the README's figures were made (the per-sample
        # seeds would draw other crops; the views are otherwise the same up to float rounding).
        train_dataset=with_image_transforms(train, view, train=True, min_crop_scale=0.6, per_sample_seed=False),
        processing_class=processor,
    )
    start = time.time()
    trainer.train()
    elapsed = time.time() - start
    trainer.save_model(work_dir)
    with open(os.path.join(work_dir, "recipe.json"), "w") as f:
        json.dump(dict(recipe, train_seconds=elapsed), f, indent=2)
    # Publish atomically: an interrupted run never leaves a half-written teacher in the cache.
    if os.path.isdir(path):
        import shutil

        shutil.rmtree(path)
    os.replace(work_dir, path)
    return path


def _count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _evaluate(trainer: Any, dataset: Any) -> float:
    metrics = trainer.evaluate(dataset, metric_key_prefix="test")
    return float(metrics["test_accuracy"])


def run_demo(config: DemoConfig) -> list[dict[str, Any]]:
    """Runs the demo and returns the table rows (also printed)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .data.datasets import load_fashion_mnist, with_image_transforms
    from .data.views import ImageView
    from .models.student import create_student
    from .training.configuration import PATTrainingArguments
    from .training.trainer import PATDistillationTrainer

    t0 = time.time()
    train_full = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    if config.max_test_samples:
        test = test.select(range(min(config.max_test_samples, len(test))))
    teacher_dir = ensure_teacher(config.cache_dir, epochs=config.teacher_epochs, train_dataset=train_full)
    with open(os.path.join(teacher_dir, "recipe.json")) as f:
        teacher_recipe = json.load(f)
    teacher = AutoModelForImageClassification.from_pretrained(teacher_dir)
    teacher_processor = AutoImageProcessor.from_pretrained(teacher_dir)
    teacher_view = ImageView.from_image_processor(teacher_processor)
    subset = balanced_subset(train_full, config.train_subset, seed=config.seed)

    rows: list[dict[str, Any]] = []
    # The teacher, scored on the same test set with the same evaluation code (as a 'none' model).
    teacher_eval = PATDistillationTrainer(
        model=teacher,
        args=PATTrainingArguments(
            output_dir=os.path.join(config.output_dir, "teacher-eval"),
            distill_method="none",
            per_device_eval_batch_size=256,
            report_to=[],
            use_cpu=True,
        ),
        processing_class=teacher_processor,
    )
    teacher_acc = _evaluate(teacher_eval, with_image_transforms(test, teacher_view, train=False))
    rows.append(
        {
            "model": f"teacher: transformers ResNet ({len(train_full):,} images)",
            "method": "none",
            "test_accuracy": teacher_acc,
            "params": _count_params(teacher),
            "train_seconds": teacher_recipe.get("train_seconds"),
        }
    )

    student_args = dict(STUDENT_ARGS)
    name = student_args.pop("name")
    for method in ("none", "kd"):
        student = create_student(
            name,
            num_classes=10,
            pretrained_cfg_overlay={"crop_pct": 1.0, "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD},
            **student_args,
        )
        view = ImageView.from_timm(student)
        args = PATTrainingArguments(
            output_dir=os.path.join(config.output_dir, f"student-{method}"),
            distill_method=method,
            num_train_epochs=config.student_epochs,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=256,
            learning_rate=config.learning_rate,
            weight_decay=0.05,
            warmup_steps=0.05,
            lr_scheduler_type="cosine",
            logging_steps=50,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            seed=config.seed,
            use_cpu=True,
        )
        trainer = PATDistillationTrainer(
            model=student,
            teacher=teacher if method != "none" else None,
            args=args,
            # per_sample_seed=False: the draws the README's figures were made with (see ensure_teacher).
            train_dataset=with_image_transforms(
                subset,
                view,
                teacher_view if method != "none" else None,
                train=True,
                min_crop_scale=0.6,
                per_sample_seed=False,
            ),
            teacher_image_processor=teacher_processor if method != "none" else None,
            dataset_name="fashion_mnist",
        )
        start = time.time()
        trainer.train()
        elapsed = time.time() - start
        accuracy = _evaluate(trainer, with_image_transforms(test, view, train=False))
        trainer.save_model()
        rows.append(
            {
                "model": f"student: timm {name} ({len(subset):,} images), "
                + ("from scratch" if method == "none" else "distilled"),
                "method": method,
                "test_accuracy": accuracy,
                "params": _count_params(student),
                "train_seconds": elapsed,
                "export": args.output_dir,
            }
        )
    _print_table(rows)
    print(f"\nTotal demo time: {time.time() - t0:.0f} s. Distilled student exported to {rows[-1]['export']}")
    print(f"Load it with: timm.create_model('local-dir:{rows[-1]['export']}', pretrained=True)")
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = f"| {'model':<52} | {'method':<6} | {'test top-1':>10} | {'params':>8} | {'train time':>10} |"
    print("\n" + header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        secs = r.get("train_seconds")
        print(
            f"| {r['model']:<52} | {r['method']:<6} | {100 * r['test_accuracy']:>9.2f}% | "
            f"{r['params'] / 1e6:>7.2f}M | {(f'{secs:.0f} s' if secs else '-'):>10} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoConfig()
    for field_name, value in vars(defaults).items():
        kind = type(value) if value is not None else int
        parser.add_argument(f"--{field_name}", type=kind, default=value)
    config = DemoConfig(**vars(parser.parse_args(argv)))
    logging.basicConfig(level=logging.WARNING)
    run_demo(config)


if __name__ == "__main__":
    main()
