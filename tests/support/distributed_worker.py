"""One process of the multi-process tests (tests/test_distributed.py).

Launched on N processes by ``torchrun`` / ``accelerate launch`` (``python distributed_worker.py SPEC.json``), or
called in-process (:func:`run_scenario`) for the one-process references. Every scenario trains the same tiny
models on the same data with PATDistillationTrainer and returns what the tests compare: the wrapper's state,
PAT's per-process feedback, the log history, evaluation metrics, the batches this process saw and the files it
opened for writing.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import torch

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.data.datasets import collate_images
from pat_hf.models.teacher import load_teacher
from support.tiny import make_image_dataset, tiny_args, tiny_teacher

GLOBAL_BATCH = 8
TRAIN_SIZE = 16  # two global batches per epoch: max_steps=4 crosses an epoch boundary (a reshuffle)
EVAL_SIZE = 13  # not a multiple of 2 processes x eval batch 4: the last global batch is padded
MAX_STEPS = 4
SMALL_PAT = {"pat_dim": 32, "pat_num_heads": 4}

# Written by the audit hook: (event, path) for every file this process opened for writing, and every directory
# it created, renamed or removed, under the watched directories.
WRITES: list[tuple[str, str]] = []
_WATCHED: list[str] = []


class RecordingCollator:
    """``collate_images`` that also records each batch's per-image fingerprint (the sum of its pixels)."""

    def __init__(self) -> None:
        self.phase = "train"
        self.seen: dict[str, list[list[float]]] = defaultdict(list)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = collate_images(examples)
        self.seen[self.phase].append(batch["pixel_values"].double().flatten(1).sum(1).tolist())
        return batch


def _audit(event: str, args: tuple) -> None:
    # Why an audit hook: it sees every write made through Python (open, os.open, mkdir, rename, remove) in any
    # library, so "rank 1 writes nothing" is observed, not inferred from reading the code paths.
    if not _WATCHED:
        return
    path = None
    if event == "open":
        name, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        path = name if writing else None
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        path = args[0]
    elif event in ("os.rename", "os.replace", "shutil.copyfile", "shutil.move"):
        path = args[1]
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if any(path.startswith(root) for root in _WATCHED):
            WRITES.append((event, path))


def build_trainer(scenario: dict[str, Any], workdir: str, world_size: int) -> tuple[PATDistillationTrainer, Any]:
    """The trainer of one scenario; the per-device batch is the global batch split over ``world_size``."""
    method = scenario["method"]
    accumulation = scenario.get("gradient_accumulation_steps", 1)
    per_device = GLOBAL_BATCH // (world_size * accumulation)
    torch.manual_seed(0)
    student = create_student("test_vit", num_classes=3, img_size=16)
    teacher = tiny_teacher("vit")
    view = ImageView.from_timm(student)
    # Augmented training data: every draw (crop, flip, RandAugment, erasing box and fill) is seeded per sample
    # from (seed, epoch, index), so 1 and 2 processes see the same pixels, in both epochs (under DDP the epoch
    # reaches the data through the trainer's callback, not accelerate's sampler).
    train = with_image_transforms(
        make_image_dataset(n=TRAIN_SIZE),
        view,
        load_teacher(teacher).view,
        train=True,
        auto_augment="rand-m9-mstd0.5-inc1",
        re_prob=0.5,
    )
    evaluation = with_image_transforms(make_image_dataset(n=EVAL_SIZE, seed=1), view, None, train=False)
    overrides = dict(
        distill_method=method,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=accumulation,
        max_steps=MAX_STEPS,
        optim="sgd",
        learning_rate=0.1,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        **scenario.get("args", {}),
    )
    if method == "pat":
        overrides = {**SMALL_PAT, **overrides}
    args = tiny_args(Path(workdir) / scenario["name"], **overrides)
    collator = RecordingCollator()
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=evaluation,
    )
    return trainer, collator


def run_scenario(scenario: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Trains (and optionally evaluates and exports) one scenario; returns this process's results."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    result: dict[str, Any] = {"name": scenario["name"]}
    if scenario.get("example_argv") is not None:
        return {**result, **_run_example(scenario, workdir)}
    trainer, collator = build_trainer(scenario, workdir, world_size)
    result["process_index"] = trainer.args.process_index
    result["world_size"] = trainer.args.world_size
    try:
        trainer.train()
    except Exception as error:  # the expected-failure scenario reports what DDP raised
        if not scenario.get("expect_error"):
            raise
        result["error"] = "".join(traceback.format_exception_only(type(error), error))
        return result
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    result["state"] = {k: v.detach().cpu().clone() for k, v in wrapper.state_dict().items()}
    result["feedback"] = {k: v.detach().cpu().clone() for k, v in wrapper.method.extra_state_tensors().items()}
    if trainer.model_ema is not None:
        result["ema"] = {k: v.detach().cpu().clone() for k, v in trainer.model_ema.state_dict().items()}
    result["log_history"] = list(trainer.state.log_history)
    result["ddp_find_unused_parameters"] = getattr(trainer.model_wrapped, "find_unused_parameters", None)
    result["teacher_device"] = str(next(trainer.teacher.model.parameters()).device)
    if scenario.get("evaluate"):
        collator.phase = "eval"
        result["eval"] = trainer.evaluate()
    if scenario.get("export"):
        trainer.save_model()
        trainer.create_model_card()
        if not trainer.is_world_process_zero():
            # Trainer.push_to_hub returns before any Hub call on every process but the world's first; offline,
            # reaching the Hub would raise here.
            trainer.args.hub_model_id = "nobody/never-pushed"
            result["push_returned"] = trainer.push_to_hub() is None
    result["seen"] = dict(collator.seen)
    return result


def _run_example(scenario: dict[str, Any], workdir: str) -> dict[str, Any]:
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(root, "examples", "run_image_classification_pat.py")
    spec = importlib.util.spec_from_file_location("run_image_classification_pat", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    metrics = module.main(list(scenario["example_argv"]))
    return {"example_metrics": metrics}


def main(argv: list[str]) -> None:
    """``distributed_worker.py SPEC.json``: runs the spec's scenarios, writing ``{name}-rank{r}.pt`` files."""
    with open(argv[0], encoding="utf-8") as f:
        spec = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    workdir, results_dir = spec["workdir"], spec["results_dir"]
    os.makedirs(results_dir, exist_ok=True)
    _WATCHED.append(os.path.abspath(workdir))
    sys.addaudithook(_audit)
    for scenario in spec["scenarios"]:
        start = len(WRITES)
        result = run_scenario(scenario, workdir)
        result["writes"] = WRITES[start:]
        torch.save(result, os.path.join(results_dir, f"{scenario['name']}-rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])
