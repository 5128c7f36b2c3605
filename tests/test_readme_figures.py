"""The README's figures come from the JSON the result pages come from, and agree with docs/results.md."""

from __future__ import annotations

import json

import pytest

from benchmarks import readme_figures
from benchmarks.fashion_mnist.summary import _fmt_acc, _pair_label, _variant_label


def _results() -> dict:
    with open(readme_figures.RESULTS_JSON, encoding="utf-8") as f:
        return json.load(f)


def test_the_readme_blocks_are_rendered_from_the_committed_json():
    with open(readme_figures.README, encoding="utf-8") as f:
        blocks = readme_figures.readme_blocks(f.read())
    assert set(blocks) == {"study", "demo"}
    assert blocks == readme_figures.rendered_blocks(), "README.md is stale: run python benchmarks/readme_figures.py"


def test_every_figure_of_the_json_is_in_the_results_page_table():
    with open("docs/results.md", encoding="utf-8") as f:
        table = [line for line in f.read().split("## Test top-1", 1)[1].splitlines() if line.startswith("| student,")]
    cells = {}
    for line in table:
        model, method, test, val, n = (c.strip() for c in line.strip("|").split("|")[:5])
        cells[(model.rsplit(" (", 1)[0].removeprefix("student, "), method)] = (test, val, int(n))
    results = _results()
    assert len(cells) == len(results["rows"])
    for row in results["rows"]:
        key = (_pair_label(row["pair"]), _variant_label(row["variant"]))
        expected = (
            _fmt_acc(row["test_mean"], row["test_std"], row["n"]),
            _fmt_acc(row["val_mean"], row["val_std"], row["n"]),
            row["n"],
        )
        assert cells.get(key) == expected, key


def test_the_study_table_bolds_each_pair_s_best_mean_and_marks_missing_cells():
    results = {
        "rows": [
            {"pair": "p", "variant": "none", "test_mean": 0.5, "test_std": 0.01, "n": 3},
            {"pair": "p", "variant": "kd", "test_mean": 0.6, "test_std": 0.02, "n": 3},
            {"pair": "q", "variant": "none", "test_mean": 0.7, "test_std": 0.0, "n": 1, "source": "carried: 0.2"},
        ]
    }
    table = readme_figures.render_study_table(results).splitlines()
    assert table[0] == "| pair | scratch | kd (T = 4) |"
    assert table[2] == "| p | 50.00 ± 1.00 | **60.00 ± 2.00** |"
    assert table[3] == "| q | **70.00** ‡ | – |"


def test_a_stale_readme_is_reported(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    with open(readme_figures.README, encoding="utf-8") as f:
        readme.write_text(f.read().replace("| ViT → ResNet (timm resnet10t) |", "| ViT → ResNet (edited) |", 1))
    monkeypatch.setattr(readme_figures, "README", str(readme))
    assert readme_figures.main(["--check"]) == 1
    assert readme_figures.update_readme(str(readme)) == ["study"]
    assert readme_figures.main(["--check"]) == 0


@pytest.mark.parametrize("block", ["study", "demo"])
def test_a_readme_without_a_block_is_refused(tmp_path, block):
    readme = tmp_path / "README.md"
    with open(readme_figures.README, encoding="utf-8") as f:
        readme.write_text(f.read().replace(f"<!-- generated:{block} -->", ""))
    with pytest.raises(ValueError, match=block):
        readme_figures.update_readme(str(readme))
