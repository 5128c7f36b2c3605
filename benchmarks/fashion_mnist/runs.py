"""The study's runs: the plan, what defines each run (its settings, compared on resume), and :func:`run_study`,
which trains every unfinished run and writes one JSON file per run."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import (
    ABLATIONS,
    DKD_SETTINGS,
    IMAGE_SIZE,
    METHOD_VARIANTS,
    METHODS,
    OFA_WEIGHTS,
    PAIRS,
    PAT_SETTINGS,
    RSD_SETTINGS,
    RSD_SWEEP,
    STUDENT_CROP_PAD,
    STUDENT_LABEL_SMOOTHING,
    STUDENT_RECIPES,
    STUDENT_TRAINING_RECIPES,
    TEACHER_BATCH_SIZE,
    TEACHER_CROP_PAD,
    TEACHER_EPOCHS,
    TEACHER_RECIPES,
    StudyConfig,
    pair_and_recipe,
    recipe_label,
    recipe_pairs,
)
from .data import StudyData, load_study_data
from .training import _teacher_dir, _train_student, _train_teacher


@dataclass(frozen=True)
class RunSpec:
    """One unit of the study: a teacher, or a student trained with one method (or ablation) and seed."""

    kind: str  # "teacher" | "student"
    name: str  # teacher name, or pair name
    method: str = "none"  # for students: a method of METHODS or an ablation of ABLATIONS
    seed: int = 0

    @property
    def run_id(self) -> str:
        if self.kind == "teacher":
            return f"teacher-{self.name}"
        return f"{self.name}-{self.method}-s{self.seed}"


def plan_runs(config: StudyConfig) -> list[RunSpec]:
    """The runs of the study in execution order: teachers first, then every pair x method x seed."""
    teachers = []
    with_teacher = any({**METHOD_VARIANTS, **ABLATIONS}.get(m, (m,))[0] != "none" for m in config.methods)
    for pair in config.pairs:
        if pair not in PAIRS:
            raise ValueError(f"Unknown pair {pair!r}; the study has {list(PAIRS)}.")
        if (with_teacher or config.ablations) and PAIRS[pair][0] not in teachers:
            teachers.append(PAIRS[pair][0])
    runs = [RunSpec("teacher", t) for t in teachers]
    for method in config.methods:
        if method not in METHODS and method not in RSD_SWEEP:
            raise ValueError(f"Unknown method {method!r}; the study has {list(METHODS)}.")
    for recipe in config.recipes:
        if recipe not in STUDENT_TRAINING_RECIPES:
            raise ValueError(f"Unknown recipe {recipe!r}; the study has {list(STUDENT_TRAINING_RECIPES)}.")
    for recipe in config.recipes:
        names = [p if recipe == "flips" else f"{p}@{recipe}" for p in config.pairs if p in recipe_pairs(recipe)]
        for seed in config.seeds:
            for name in names:
                runs += [RunSpec("student", name, method, seed) for method in config.methods]
    if config.ablations:
        runs += [RunSpec("student", pair, ablation, config.seeds[0]) for pair in config.pairs for ablation in ABLATIONS]
    return runs


def _versions() -> dict[str, str]:
    import timm
    import transformers

    from pat_hf import __version__

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "pat_hf": __version__,
    }
    try:
        import accelerate

        versions["accelerate"] = accelerate.__version__
    except ImportError:  # pragma: no cover - accelerate is a dependency of Trainer
        pass
    return versions


def _hardware(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        # On shared CPUs the wall times depend on what else runs: the load says how shared they were.
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
    # Atomic: an interrupted study never leaves a half-written JSON that the resume would trust.
    os.replace(tmp, path)


def _augmentation(pad: int) -> str:
    return f"pad {pad} + random crop 32, horizontal flip" if pad else "horizontal flip"


def _run_settings(config: StudyConfig, spec: RunSpec) -> dict[str, Any]:
    """What defines a run; a finished run is only reused when these are unchanged."""
    common = {
        "mode": config.mode,
        "image_size": IMAGE_SIZE,
        "optimizer": "adamw_torch",
        "lr_schedule": "cosine, 5% warm-up",
        "weight_decay": config.weight_decay,
        "max_train_images": config.max_train_images,
        "max_eval_images": config.max_eval_images,
        "max_steps": config.max_steps,
    }
    if spec.kind == "teacher":
        return {
            **common,
            "teacher": spec.name,
            "recipe": TEACHER_RECIPES[spec.name],
            "epochs": config.teacher_epochs or TEACHER_EPOCHS[spec.name],
            "augmentation": _augmentation(TEACHER_CROP_PAD[spec.name]),
            "batch_size": config.teacher_batch_size or TEACHER_BATCH_SIZE[spec.name],
            "learning_rate": config.teacher_lr,
            "seed": 0,
        }
    pair, recipe = pair_and_recipe(spec.name)
    teacher, student = PAIRS[pair]
    base_method, overrides = {**METHOD_VARIANTS, **ABLATIONS}.get(spec.method, (spec.method, {}))
    method_args: dict[str, Any] = {"label_smoothing": STUDENT_LABEL_SMOOTHING}
    if base_method == "pat":
        method_args.update(PAT_SETTINGS)
    if base_method == "dkd":
        method_args.update(DKD_SETTINGS)
    if base_method == "rsd" and spec.method not in RSD_SWEEP:
        method_args.update(RSD_SETTINGS)
    if base_method == "ofa":
        method_args["ofa_weight"] = OFA_WEIGHTS[student]
    method_args.update(overrides)
    return {
        **common,
        "pair": spec.name,
        "teacher": teacher,
        # A student is only as reusable as its teacher: a teacher trained otherwise invalidates the student runs.
        "teacher_settings": _run_settings(config, RunSpec("teacher", teacher)) if base_method != "none" else None,
        "student": student,
        "student_recipe": STUDENT_RECIPES[student],
        "method": base_method,
        "variant": spec.method,
        "method_args": method_args,
        "epochs": config.student_epochs,
        "augmentation": _augmentation(STUDENT_CROP_PAD) if recipe == "flips" else recipe_label(recipe),
        "training_recipe": recipe,
        "recipe_args": STUDENT_TRAINING_RECIPES[recipe],
        "batch_size": config.student_batch_size,
        "learning_rate": config.student_lr,
        "subset_size": config.subset_size,
        "seed": spec.seed,
    }


def _run_path(config: StudyConfig, spec: RunSpec) -> str:
    return os.path.join(config.output_dir, "runs", f"{spec.run_id}.json")


def _finished(config: StudyConfig, spec: RunSpec, settings: dict[str, Any]) -> bool:
    path = _run_path(config, spec)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if saved.get("settings") != json.loads(json.dumps(settings)):
        raise ValueError(
            f"{path} holds a run with other settings (mode {saved.get('settings', {}).get('mode')!r}). Use another "
            "--output-dir for these settings, or delete that file to rerun it."
        )
    # A teacher's JSON without its published model folder (deleted by hand) is not a finished teacher.
    return spec.kind != "teacher" or os.path.isfile(os.path.join(_teacher_dir(config, spec.name), "config.json"))


def run_study(config: StudyConfig, data: StudyData | None = None) -> list[dict[str, Any]]:
    """Runs every unfinished run of the study (finished ones are skipped) and returns all their records.

    Args:
        config: The study settings.
        data: Preloaded data (tests); read from the IDX files when None.

    Returns:
        The per-run records, in plan order, as written to ``<output_dir>/runs/<run_id>.json``.
    """
    device = config.resolved_device()
    data = data if data is not None else load_study_data(config)
    plan = plan_runs(config)
    records = []
    total_start = time.time()
    for i, spec in enumerate(plan, 1):
        settings = _run_settings(config, spec)
        path = _run_path(config, spec)
        if _finished(config, spec, settings):
            print(f"[{i}/{len(plan)}] {spec.run_id}: done already, skipped ({path})", flush=True)
            with open(path, encoding="utf-8") as f:
                records.append(json.load(f))
            continue
        print(f"[{i}/{len(plan)}] {spec.run_id}: training on {device} ...", flush=True)
        start = time.time()
        if spec.kind == "teacher":
            result = _train_teacher(config, spec, data, settings)
        else:
            result = _train_student(config, spec, data, settings)
        record = {
            "run_id": spec.run_id,
            "kind": spec.kind,
            "name": spec.name,
            "variant": spec.method if spec.kind == "student" else "none",
            "seed": spec.seed,
            "settings": settings,
            "data": data.describe(),
            "hardware": _hardware(device),
            "versions": _versions(),
            "wall_seconds": time.time() - start,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **result,
        }
        _write_json(path, record)
        records.append(record)
        flag = "  NON-FINITE LOSS" if record["loss_summary"]["non_finite"] else ""
        print(
            f"[{i}/{len(plan)}] {spec.run_id}: test top-1 {100 * record['test_top1']:.2f}%, "
            f"val {100 * record['val_top1']:.2f}%, train {record['train_seconds']:.0f} s, "
            f"{record['steps']} steps{flag}",
            flush=True,
        )
    print(f"Study: {len(plan)} runs, {time.time() - total_start:.0f} s this invocation.", flush=True)
    return records
