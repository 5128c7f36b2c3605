"""The study's records summarised for the report: grouping over seeds, the comparisons and the table parts."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

from .config import ABLATION_LABELS, ABLATIONS, METHOD_LABELS, PAIRS, pair_and_recipe, recipe_label


def load_runs(output_dir: str) -> list[dict[str, Any]]:
    """Every finished run's record under ``<output_dir>/runs``, sorted by run id."""
    folder = os.path.join(output_dir, "runs")
    if not os.path.isdir(folder):
        return []
    records = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                records.append(json.load(f))
    return records


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _fmt_acc(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if n > 1 else f"{100 * mean:.2f}"


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Groups the records: teachers by name, students by (pair, variant), with mean/std of test top-1."""
    teachers = {r["name"]: r for r in records if r["kind"] == "teacher"}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["kind"] == "student":
            groups.setdefault((r["name"], r["variant"]), []).append(r)
    rows = {}
    for key, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        test_mean, test_std = _stats([r["test_top1"] for r in runs])
        val_mean, val_std = _stats([r["val_top1"] for r in runs])
        rows[key] = {
            "runs": runs,
            "n": len(runs),
            "seeds": [r["seed"] for r in runs],
            "test_mean": test_mean,
            "test_std": test_std,
            "val_mean": val_mean,
            "val_std": val_std,
            "train_seconds": statistics.fmean([r["train_seconds"] for r in runs]),
            "non_finite": any(r["loss_summary"]["non_finite"] for r in runs),
        }
    return {"teachers": teachers, "rows": rows}


def _compare(rows: dict[tuple[str, str], dict[str, Any]], pair: str, a: str, b: str) -> str | None:
    """One sentence comparing variant ``a`` with ``b`` on ``pair``.

    A difference of means smaller than the larger seed standard deviation is a tie. With a single seed on both
    sides there is no spread to judge by, so no conclusion is drawn; with a single seed on one side the other
    side's spread is the yardstick, and the sentence says so.
    """
    ra, rb = rows.get((pair, a)), rows.get((pair, b))
    if ra is None or rb is None:
        return None
    delta = ra["test_mean"] - rb["test_mean"]
    spread = max(ra["test_std"], rb["test_std"])
    label_a, label_b = _variant_label(a), _variant_label(b)
    seeds = f"n = {ra['n']} / {rb['n']} seeds"
    if max(ra["n"], rb["n"]) < 2:
        return f"{label_a} vs {label_b}: {100 * delta:+.2f} points, one seed each: no seed spread, no conclusion."
    if abs(delta) < spread:
        return (
            f"{label_a} vs {label_b}: {100 * delta:+.2f} points, smaller than the seed spread "
            f"({100 * spread:.2f}; {seeds}): a tie."
        )
    word = "above" if delta > 0 else "below"
    caveat = " (one seed on one side: weak evidence)" if min(ra["n"], rb["n"]) < 2 else ""
    return (
        f"{label_a} vs {label_b}: {100 * delta:+.2f} points ({label_a} {word}), larger than the seed spread "
        f"({100 * spread:.2f}; {seeds}){caveat}."
    )


def _variant_label(variant: str) -> str:
    return ABLATION_LABELS.get(variant, METHOD_LABELS.get(variant, variant))


def _pair_label(pair: str) -> str:
    base, recipe = pair_and_recipe(pair)
    teacher, student = PAIRS.get(base, (base, "?"))
    names = {"vit": "ViT", "convnext": "ConvNeXt", "resnet": "ResNet (timm resnet10t)", "deit": "DeiT (timm)"}
    label = f"{names.get(teacher, teacher)} → {names.get(student, student)}"
    return label if recipe == "flips" else f"{label}, {recipe_label(recipe)}"


def pair_teacher(pair: str) -> str:
    """The teacher of a student run's pair (``pair`` or ``pair@recipe``)."""
    return PAIRS.get(pair_and_recipe(pair)[0], ("",))[0]


def _hardware_line(records: list[dict[str, Any]]) -> str:
    seen = []
    for r in records:
        hw = r.get("hardware", {})
        label = (
            f"GPU: {hw['gpu']} (bf16 autocast)"
            if hw.get("gpu")
            else f"CPU: {hw.get('cpu')}, {hw.get('cpu_count')} cores, {hw.get('torch_threads')} torch threads"
        )
        if label not in seen:
            seen.append(label)
    return "; ".join(seen) if seen else "unknown"


def _command(records: list[dict[str, Any]], output_dir: str) -> str:
    modes = {r["settings"]["mode"] for r in records}
    seeds = sorted({r["seed"] for r in records if r["kind"] == "student"})
    ablations = any(r["variant"] in ABLATIONS for r in records)
    devices = {r.get("hardware", {}).get("device") for r in records}
    parts = ["python benchmarks/fashion_mnist_study.py"]
    if "quick" in modes:
        parts.append("--quick")
    elif seeds and seeds != [0, 1, 2]:
        parts.append("--seeds " + " ".join(str(s) for s in seeds))
    if ablations:
        parts.append("--ablations")
    recipes = sorted({pair_and_recipe(r["name"])[1] for r in records if r["kind"] == "student"} - {"flips"})
    if recipes:
        parts.append("--recipes flips " + " ".join(recipes))
    if devices == {"cuda"}:
        parts.append("--device cuda")
    default_dir = "outputs/study-quick" if "quick" in modes else "outputs/study"
    if output_dir.rstrip("/") != default_dir:
        parts.append(f"--output-dir {output_dir}")
    return " ".join(parts)


def _elapsed_seconds(records: list[dict[str, Any]]) -> float | None:
    """From the first run's start to the last run's end (runs of several processes overlap), when known."""
    spans = []
    for r in records:
        try:
            end = time.mktime(time.strptime(r["finished_at"][:19], "%Y-%m-%dT%H:%M:%S"))
        except (KeyError, ValueError):
            return None
        spans.append((end - r["wall_seconds"], end))
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else None


def _pair_seconds(records: list[dict[str, Any]]) -> dict[str, float]:
    """Wall time of each pair's runs added up, its teacher included: what one ``--jobs`` process per pair takes,
    however the runs were actually scheduled (resumed studies span several sittings)."""
    seconds: dict[str, float] = {}
    for pair, (teacher, _) in PAIRS.items():
        runs = [
            r
            for r in records
            if (r["kind"], r["name"]) == ("teacher", teacher)
            or (r["kind"] == "student" and pair_and_recipe(r["name"])[0] == pair)
        ]
        if any(r["kind"] == "student" for r in runs):
            seconds[pair] = sum(r["wall_seconds"] for r in runs)
    return seconds


def _prompt_effect_lines(
    rows: dict[tuple[str, str], dict[str, Any]], pairs: list[str], variants: list[str]
) -> list[str]:
    """The table of what the trained prompts did to the teacher (PAT runs that recorded it), means over seeds."""
    table = []
    for pair in pairs:
        for variant in variants:
            row = rows.get((pair, variant))
            effects = [r["prompt_effect"] for r in (row["runs"] if row else []) if r.get("prompt_effect")]
            if not effects:
                continue
            stages = sorted({int(k) for e in effects for k in e["beta"]})
            # Magnitudes: the sign of β is arbitrary (the prompt's last convolution can absorb it); signed means cancel.
            beta = ", ".join(f"{statistics.mean(abs(e['beta'][str(st)]) for e in effects):.3f}" for st in stages)
            change = ", ".join(
                f"{100 * statistics.mean(e['feature_change'][i] for e in effects):.1f}" for i in range(4)
            )
            plain = statistics.mean(e["plain_top1"] for e in effects)
            prompted = statistics.mean(e["prompted_top1"] for e in effects)
            kl = statistics.mean(e["logit_kl"] for e in effects)
            table.append(
                f"| {_pair_label(pair)} | {_variant_label(variant)} | {len(effects)} | {beta or '–'} | {change} | "
                f"{100 * plain:.2f} → {100 * prompted:.2f} | {kl:.4f} |"
            )
    if not table:
        return []
    images = next(r["prompt_effect"]["images"] for row in rows.values() for r in row["runs"] if r.get("prompt_effect"))
    return [
        "## What the prompts did to the teacher",
        "",
        f"Measured after training on {images:,} of the students' training images as the students see them, each "
        "batch's prompts fed the previous batch's feedback as in training (student, heads and prompts in eval "
        "mode); means over the runs that recorded it. Magnitude of β: the size of each prompted stage's learned scale (0 at the "
        "start: the plain teacher; its sign is arbitrary). Stage change: ‖F_t − F_t0‖ / ‖F_t0‖, the prompted teacher's stage outputs "
        "(what HCL aligns the student to) against the plain teacher's. Top-1: the teacher without and with the "
        "prompts on those images. KL: KL(z_t ‖ z_t0), what the regulariser penalises.",
        "",
        "| pair | variant | runs | magnitude of β (prompted stages) | stage change, stages 1–4 (%) | teacher top-1, plain → prompted (%) "
        "| KL |",
        "|---|---|---|---|---|---|---|",
        *table,
        "",
    ]
