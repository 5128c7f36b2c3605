"""The README's tables of figures, generated from the JSON the result pages are generated from.

- The study table: from ``docs/results.json``, which ``benchmarks/fashion_mnist_study.py`` writes together with
  ``docs/results.md`` (the page's main table is rendered from the same rows).
- The demo table: from ``docs/demo.json``, the ``results.json`` that ``make demo`` writes (``outputs/demo/``),
  copied into docs/ when the README's figures are refreshed from a new demo run.

Each table sits in the README between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; nothing else of
the README is touched. ``tests/test_readme_figures.py`` fails when a block differs from what this script renders.

Usage::

    python benchmarks/readme_figures.py           # rewrite the README's blocks
    python benchmarks/readme_figures.py --check   # exit 1, naming the blocks, when the README is stale
    python benchmarks/readme_figures.py --demo outputs/demo/results.json   # take a new demo run's figures first
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS_JSON = os.path.join(ROOT, "docs", "results.json")
DEMO_JSON = os.path.join(ROOT, "docs", "demo.json")

# The study table's columns, in this order when present: (variant, header).
STUDY_COLUMNS = (
    ("none", "scratch"),
    ("kd", "kd (T = 4)"),
    ("kd_t1", "kd (T = 1)"),
    ("dkd", "dkd"),
    ("dist", "dist"),
    ("fitnet", "fitnet"),
    ("ofa", "ofa"),
    ("pat", "pat"),
    ("rsd", "rsd"),
)
PAIR_NAMES = {
    "vit_to_resnet": "ViT → ResNet (timm resnet10t)",
    "convnext_to_deit": "ConvNeXt → DeiT (timm)",
    "convnext_to_deit@strong": "ConvNeXt → DeiT, RandAugment + Mixup/CutMix + EMA",
}


def _cell(row: dict[str, Any]) -> str:
    if row["n"] > 1:
        return f"{100 * row['test_mean']:.2f} ± {100 * row['test_std']:.2f}"
    return f"{100 * row['test_mean']:.2f}"


def render_study_table(results: dict[str, Any]) -> str:
    """Test top-1 (%) per pair and method, mean ± std over seeds, the best mean of each pair in bold, rows carried
    from an earlier study (no run files) marked ‡."""
    rows = {(r["pair"], r["variant"]): r for r in results["rows"]}
    pairs = list(dict.fromkeys(r["pair"] for r in results["rows"]))
    columns = [(v, h) for v, h in STUDY_COLUMNS if any((p, v) in rows for p in pairs)]
    lines = ["| pair | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for pair in pairs:
        present = [rows[(pair, v)] for v, _ in columns if (pair, v) in rows]
        best = max(r["test_mean"] for r in present)
        cells = []
        for variant, _ in columns:
            row = rows.get((pair, variant))
            if row is None:
                cells.append("–")
                continue
            text = _cell(row)
            text = f"**{text}**" if row["test_mean"] == best else text
            # ‡: carried from an earlier study whose run files were not kept (docs/results.md says which).
            cells.append(text + " ‡" if row.get("source", "").startswith("carried") else text)
        lines.append(f"| {PAIR_NAMES.get(pair, pair)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_demo_table(rows: list[dict[str, Any]]) -> str:
    """The demo's teacher, scratch and distilled student, as ``make demo`` prints them."""
    lines = ["| model | method | test top-1 | params | train time |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        accuracy = f"{100 * row['test_accuracy']:.2f}%"
        if i == len(rows) - 1 and row["method"] != "none":
            accuracy = f"**{accuracy}**"
        lines.append(
            f"| {row['model']} | {row['method']} | {accuracy} | {row['params'] / 1e6:.2f}M | "
            f"{row['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def rendered_blocks() -> dict[str, str]:
    """Every generated block of the README, rendered from the committed JSON files."""
    with open(RESULTS_JSON, encoding="utf-8") as f:
        results = json.load(f)
    with open(DEMO_JSON, encoding="utf-8") as f:
        demo = json.load(f)
    return {"study": render_study_table(results), "demo": render_demo_table(demo)}


def _block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- generated:{name} -->\n)(.*?)(\n<!-- /generated:{name} -->)", re.S)


def readme_blocks(text: str) -> dict[str, str]:
    """The generated blocks as they stand in a README text."""
    found = {}
    for name in ("study", "demo"):
        match = _block_pattern(name).search(text)
        if match:
            found[name] = match.group(2)
    return found


def update_readme(path: str = README) -> list[str]:
    """Rewrites the README's blocks; returns the names of those that changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    changed = []
    for name, body in rendered_blocks().items():
        pattern = _block_pattern(name)
        if not pattern.search(text):
            raise ValueError(f"{path} has no <!-- generated:{name} --> block")
        new = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(3), text)
        if new != text:
            changed.append(name)
            text = new
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a block is stale")
    parser.add_argument("--demo", help="a demo run's results.json to copy to docs/demo.json first")
    args = parser.parse_args(argv)
    if args.demo:
        shutil.copyfile(args.demo, DEMO_JSON)
    if args.check:
        with open(README, encoding="utf-8") as f:
            current = readme_blocks(f.read())
        stale = [name for name, body in rendered_blocks().items() if current.get(name) != body]
        if stale:
            print(f"README.md is stale: {', '.join(stale)} (run python benchmarks/readme_figures.py)", file=sys.stderr)
            return 1
        return 0
    changed = update_readme()
    print(f"README.md: {', '.join(changed) if changed else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
