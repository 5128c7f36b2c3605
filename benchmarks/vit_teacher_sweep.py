"""Chooses the study's ViT teacher recipe on held-out data: each candidate trains on the 55,000 training images
outside the study's validation split and is scored on that split after every epoch (never on the test set).

The study's teachers then train on all 60,000 images, so their own validation score is not held out; this sweep
is where the recipe choice is made. Candidates are compared at roughly equal compute (one thread each).

    OMP_NUM_THREADS=1 python benchmarks/vit_teacher_sweep.py --hidden 96 --batch 64 --epochs 2 &
    OMP_NUM_THREADS=1 python benchmarks/vit_teacher_sweep.py --hidden 64 --batch 64 --epochs 4 &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

# Run as a script, Python puts benchmarks/ on the path, not the repository root that holds the study package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fashion_mnist import (
    IMAGE_SIZE,
    FashionTensors,
    StudyConfig,
    build_teacher,
    count_params,
    load_study_data,
    top1_metrics,
)
from benchmarks.fashion_mnist.training import _training_args
from pat_hf.data.datasets import TensorBatchCollator


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--mlp-ratio", type=int, default=2)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pad", type=int, default=0, help="Random-crop padding (0: flips only).")
    parser.add_argument("--out", default="outputs/vit_sweep")
    parser.add_argument("--max-train-images", type=int, help=argparse.SUPPRESS)  # tests only
    parser.add_argument("--max-eval-images", type=int, help=argparse.SUPPRESS)  # tests only
    args = parser.parse_args(argv)

    from pat_hf.training.trainer import PATDistillationTrainer

    config = StudyConfig(output_dir=args.out)
    data = load_study_data(config)
    held_out = np.setdiff1d(np.arange(len(data.train_labels)), data.val)[: args.max_train_images]
    val = data.val[: args.max_eval_images]
    torch.manual_seed(0)
    model, processor = build_teacher(
        "vit",
        hidden_size=args.hidden,
        intermediate_size=args.hidden * args.mlp_ratio,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    with tempfile.TemporaryDirectory() as work:
        trainer = PATDistillationTrainer(
            model=model,
            args=_training_args(
                config,
                work,
                epochs=args.epochs,
                batch_size=args.batch,
                lr=args.lr,
                seed=0,
                distill_method="none",
                eval_strategy="epoch",
            ),
            data_collator=TensorBatchCollator(pad=args.pad, image_size=IMAGE_SIZE),
            train_dataset=FashionTensors(data.train_images, data.train_labels, held_out, augment=True),
            eval_dataset=FashionTensors(data.train_images, data.train_labels, val),
            processing_class=processor,
            compute_metrics=top1_metrics,
        )
        start = time.time()
        trainer.train()
        seconds = time.time() - start
    curve = [round(e["eval_accuracy"], 4) for e in trainer.state.log_history if "eval_accuracy" in e]
    result = {
        **vars(args),
        "train_images": len(held_out),
        "val_images": len(val),
        "params": count_params(model),
        "seconds": round(seconds),
        "val_curve": curve,
    }
    print(json.dumps(result))
    os.makedirs(args.out, exist_ok=True)
    name = f"h{args.hidden}-l{args.layers}-b{args.batch}-e{args.epochs}-p{args.pad}-lr{args.lr}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
