"""The Fashion-MNIST study machinery: data splits, tensor augmentation, resumable runs and the generated report.

The runs here are tiny (synthetic images, one optimiser step per component); the study itself is run with
``benchmarks/fashion_mnist_study.py`` (``--quick`` took 7.5 minutes on 2 CPU cores, too long for the test suite).
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import benchmarks.fashion_mnist as study
from benchmarks.fashion_mnist import StudyConfig, StudyData, load_runs, plan_runs, run_study, write_report
from benchmarks.fashion_mnist import runs as study_runs
from pat_hf.data.datasets import FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, TensorBatchCollator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DATA = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz"))


def synthetic_data(n_train: int = 200, n_test: int = 60, seed: int = 0) -> StudyData:
    """Fashion-MNIST-shaped images whose brightness depends on the label (10 classes)."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = np.arange(n) % 10
        images = np.clip(rng.normal(20 + 20 * labels[:, None, None], 30, (n, 28, 28)), 0, 255).astype(np.uint8)
        return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))

    train_images, train_labels = split(n_train)
    test_images, test_labels = split(n_test)
    indices = np.arange(n_train)
    return StudyData(train_images, train_labels, test_images, test_labels, indices[:40], indices[100:140])


def tiny_config(output_dir: str, **overrides) -> StudyConfig:
    settings = {
        "output_dir": output_dir,
        "seeds": [0],
        "teacher_epochs": 1,
        "student_epochs": 1,
        "teacher_batch_size": 8,
        "student_batch_size": 8,
        "max_steps": 1,
        "max_eval_images": 16,
        "logging_steps": 1,
        "device": "cpu",
        "subset_size": 40,
        "val_size": 40,
    }
    return StudyConfig(**{**settings, **overrides})


def load_cli():
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist_study", os.path.join(ROOT, "benchmarks", "fashion_mnist_study.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collator_pads_crops_flips_and_normalises():
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    items = [{"image": img, "labels": i, "augment": False} for i, img in enumerate(images)]
    plain = TensorBatchCollator()(items)
    assert plain["pixel_values"].shape == (6, 3, 32, 32) and plain["labels"].tolist() == list(range(6))
    expected = (images.float() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    torch.testing.assert_close(plain["pixel_values"][:, 1, 2:30, 2:30], expected)
    background = -FASHION_MNIST_MEAN[0] / FASHION_MNIST_STD[0]
    torch.testing.assert_close(plain["pixel_values"][:, :, :2], torch.full((6, 3, 2, 32), background))

    # Without crop padding only flips remain: every image is the original or its mirror image.
    torch.manual_seed(0)
    flipped = TensorBatchCollator(pad=0)([dict(item, augment=True) for item in items])["pixel_values"]
    for x, ref in zip(flipped, plain["pixel_values"]):
        assert torch.equal(x, ref) or torch.equal(x, ref.flip(-1))

    # With padding every crop is a 32x32 window, shifted by up to 4 pixels, of the zero-padded image.
    torch.manual_seed(0)
    cropped = TensorBatchCollator(pad=4)([dict(item, augment=True) for item in items])["pixel_values"]
    assert not torch.equal(cropped, plain["pixel_values"])
    for x, img in zip(cropped[:, 0], images):
        padded = torch.nn.functional.pad(img, (6, 6, 6, 6)).float() / 255
        padded = (padded - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
        windows = [padded[top : top + 32, left : left + 32] for top in range(9) for left in range(9)]
        assert any(torch.allclose(x, w) or torch.allclose(x.flip(-1), w) for w in windows)


@pytest.mark.skipif(not HAVE_DATA, reason="apt-get install dataset-fashion-mnist")
def test_real_splits_are_balanced_disjoint_and_seed_independent():
    data = study.load_study_data(StudyConfig())
    assert len(data.train_labels) == 60_000 and len(data.test_labels) == 10_000
    assert len(data.subset) == 5000 and len(data.val) == 5000
    assert not set(data.subset.tolist()) & set(data.val.tolist())
    for split in (data.subset, data.val):
        assert np.bincount(data.train_labels[split].numpy(), minlength=10).tolist() == [500] * 10
    again = study.load_study_data(StudyConfig(seeds=[7]))
    assert np.array_equal(again.subset, data.subset) and np.array_equal(again.val, data.val)


def test_plan_orders_teachers_then_students_and_ablations():
    plan = plan_runs(StudyConfig(seeds=[0, 1], ablations=True))
    ids = [spec.run_id for spec in plan]
    assert ids[:2] == ["teacher-vit", "teacher-convnext"]
    assert len(ids) == 2 + 2 * 2 * len(study.METHODS) + 2 * 3 and len(set(ids)) == len(ids)
    assert "vit_to_resnet-pat_no_prompts-s0" in ids and "vit_to_resnet-pat_no_prompts-s1" not in ids
    settings = study_runs._run_settings(StudyConfig(), plan[-1])
    assert settings["method"] == "pat" and settings["method_args"]["pat_reg_weight"] == 0.0
    assert settings["method_args"]["pat_dim"] == study.PAT_SETTINGS["pat_dim"]
    # Every method of a pair trains with the same label smoothing; kd runs at T = 4 and T = 1.
    every = [study_runs._run_settings(StudyConfig(), s) for s in plan if s.kind == "student"]
    assert {s["method_args"]["label_smoothing"] for s in every} == {0.1}
    assert {s["method_args"].get("temperature") for s in every if s["variant"].startswith("kd")} == {None, 1.0}
    # The stronger recipe runs on ConvNeXt -> DeiT only, every method, and its runs say what they trained with.
    strong = plan_runs(StudyConfig(seeds=[0], recipes=["flips", "strong"]))
    names = {s.name for s in strong if s.kind == "student"}
    assert names == {"vit_to_resnet", "convnext_to_deit", "convnext_to_deit@strong"}
    strong_settings = study_runs._run_settings(StudyConfig(), strong[-1])
    assert strong_settings["training_recipe"] == "strong" and strong_settings["recipe_args"]["model_ema"]
    assert strong_settings["teacher"] == "convnext" and strong_settings["student"] == "deit"
    # Without a method that needs one, no teacher is trained (the recipe sweep trains scratch students only).
    assert [s.kind for s in plan_runs(StudyConfig(methods=["none"], seeds=[0]))] == ["student", "student"]


def test_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    out = str(tmp_path / "study")
    config = tiny_config(out)
    data = synthetic_data()
    records = run_study(config, data=data)

    expected = [spec.run_id for spec in plan_runs(config)]
    assert [r["run_id"] for r in records] == expected
    assert sorted(os.listdir(os.path.join(out, "runs"))) == sorted(f"{i}.json" for i in expected)
    for record in records:
        assert 0.0 <= record["test_top1"] <= 1.0 and 0.0 <= record["val_top1"] <= 1.0
        assert record["steps"] == 1 and record["train_seconds"] > 0
        assert record["test_images"] == 16 and record["hardware"]["device"] == "cpu"
        assert {"torch", "transformers", "timm", "pat_hf"} <= set(record["versions"])
        assert record["loss_curve"] and not record["loss_summary"]["non_finite"]
    pat = next(r for r in records if r["run_id"] == "convnext_to_deit-pat-s0")
    assert {"loss_ce", "loss_kd", "loss_hcl", "loss_reg"} <= set(pat["loss_curve"][0])
    assert pat["method_settings"]["pat_dim"] == study.PAT_SETTINGS["pat_dim"]
    # What the prompts did to the teacher, examined on 5 batches of 8 (the 40 subset images).
    effect = pat["prompt_effect"]
    assert effect["images"] == 40 and set(effect["beta"]) == {"1", "2", "3", "4"}
    assert len(effect["feature_change"]) == 4 and all(c >= 0 for c in effect["feature_change"])
    assert 0 <= effect["plain_top1"] <= 1 and 0 <= effect["prompted_top1"] <= 1 and effect["logit_kl"] >= 0
    assert all(r.get("prompt_effect") is None for r in records if r.get("method_settings", {}).get("method") != "pat")
    ofa = next(r for r in records if r["run_id"] == "vit_to_resnet-ofa-s0")
    assert ofa["method_settings"]["ofa_weight"] == study.OFA_WEIGHTS["resnet"]
    assert os.path.isfile(os.path.join(out, "teachers", "vit", "config.json"))

    # Resume: every run is finished, so nothing trains again and the records come back from the JSON files.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study_runs, "_train_teacher", no_training)
    monkeypatch.setattr(study_runs, "_train_student", no_training)
    assert run_study(config, data=data) == json.loads(json.dumps(records))
    # Other settings in the same folder are refused rather than mixed into the report.
    with pytest.raises(ValueError, match="other settings"):
        run_study(tiny_config(out, student_epochs=2), data=data)

    # The report comes from the JSON files alone (here through the command line's --report-only).
    markdown, figure = str(tmp_path / "docs" / "results.md"), str(tmp_path / "docs" / "results.png")
    load_cli().main(["--report-only", "--output-dir", out, "--markdown", markdown, "--figure", figure])
    text = open(markdown, encoding="utf-8").read()
    for teacher in ("ViTForImageClassification", "ConvNextForImageClassification"):
        assert f"| teacher ({teacher}, 200 images, 1 epoch(s)) | none |" in text
    for pair in ("ViT → ResNet", "ConvNeXt → DeiT"):
        for method in ("scratch", "kd (T = 4)", "kd (T = 1)", "dkd", "dist", "fitnet", "ofa", "pat"):
            assert f"| student, {pair}" in text and f"| {method} |" in text
    assert "Debug run" in text and "one seed each: no seed spread, no conclusion" in text
    assert "CPU:" in text and "--output-dir" in text
    # Teachers train on the validation images too: their val figure is flagged as not held out.
    assert text.count(" † | 1 | – |") == 2
    assert (
        "## What the prompts did to the teacher" in text and text.count("| pat | 1 | 0.000, 0.000, 0.000, 0.000 |") == 2
    )
    # What one process per pair takes: each pair's runs, its teacher's included, added up.
    for pair, teacher in (("vit_to_resnet", "vit"), ("convnext_to_deit", "convnext")):
        minutes = sum(r["wall_seconds"] for r in records if r["name"] in (pair, teacher)) / 60
        assert f"{pair}'s runs (teacher included) add up to {minutes:.1f} min" in text
    with open(figure, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(load_runs(out)) == len(expected)


def test_report_calls_ties_by_the_seed_spread(tmp_path):
    out = tmp_path / "study"
    (out / "runs").mkdir(parents=True)
    base = {
        "kind": "student",
        "name": "vit_to_resnet",
        "settings": {"mode": "full", "epochs": 1, "batch_size": 8, "learning_rate": 0.1, "weight_decay": 0.0},
        "data": {"train_images": 10, "test_images": 10, "subset_images": 5, "val_images": 5, "split_hash": "x"},
        "hardware": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3"},
        "versions": {"torch": "0"},
        "train_seconds": 1.0,
        "wall_seconds": 1.0,
        "train_images": 5,
        "params": 1000,
        "steps": 1,
        "loss_summary": {"non_finite": False},
    }
    accuracies = {"none": [0.80, 0.82, 0.84], "kd": [0.81, 0.83, 0.85], "pat": [0.90, 0.91, 0.92]}
    for variant, values in accuracies.items():
        for seed, acc in enumerate(values):
            record = dict(base, run_id=f"vit_to_resnet-{variant}-s{seed}", variant=variant, seed=seed)
            record.update(test_top1=acc, val_top1=acc)
            (out / "runs" / f"{record['run_id']}.json").write_text(json.dumps(record))
    text = write_report(str(out), str(tmp_path / "r.md"), str(tmp_path / "r.png"))
    assert "kd (T = 4) vs scratch: +1.00 points, smaller than the seed spread (2.00; n = 3 / 3 seeds): a tie." in text
    assert "pat vs scratch: +9.00 points (pat above), larger than the seed spread" in text
    assert "| 82.00 ± 2.00 |" in text
    assert "GPU: NVIDIA H100 80GB HBM3 (bf16 autocast)" in text and "--device cuda" in text


@pytest.mark.skipif(not HAVE_DATA, reason="apt-get install dataset-fashion-mnist")
def test_cli_runs_the_pairs_in_parallel_processes_then_one_report(tmp_path):
    out, markdown = str(tmp_path / "study"), str(tmp_path / "results.md")
    argv = ["--quick", "--output-dir", out, "--methods", "none", "kd", "--jobs", "2"]
    argv += ["--max-train-images", "64", "--max-eval-images", "64", "--max-steps", "1"]
    load_cli().main(argv + ["--markdown", markdown, "--figure", str(tmp_path / "results.png")])
    records = study.load_runs(out)
    assert sorted(r["run_id"] for r in records) == sorted(
        ["teacher-vit", "teacher-convnext"] + [f"{p}-{m}-s0" for p in study.PAIRS for m in ("none", "kd")]
    )
    # Each child got its share of the cores (torch reads OMP_NUM_THREADS).
    assert {r["hardware"]["torch_threads"] for r in records} == {max(1, (os.cpu_count() or 1) // 2)}
    text = open(markdown, encoding="utf-8").read()
    assert "vit_to_resnet-kd-s0" in text and "convnext_to_deit-kd-s0" in text
    # The teachers' validation curves are recorded (one point per epoch; here one cut epoch).
    assert all(len(r["val_curve"]) == 1 for r in records if r["kind"] == "teacher")


def test_a_student_run_is_tied_to_its_teacher_recipe(monkeypatch):
    spec = study.RunSpec("student", "vit_to_resnet", "kd", 0)
    before = study_runs._run_settings(StudyConfig(), spec)
    monkeypatch.setitem(study.TEACHER_EPOCHS, "vit", study.TEACHER_EPOCHS["vit"] + 1)
    after = study_runs._run_settings(StudyConfig(), spec)
    # A finished student of the old teacher is not reused for the new one (resume compares these settings).
    assert before != after and after["teacher_settings"]["epochs"] == before["teacher_settings"]["epochs"] + 1
    assert (
        study_runs._run_settings(StudyConfig(), study.RunSpec("student", "vit_to_resnet", "none", 0))[
            "teacher_settings"
        ]
        is None
    )


def test_teacher_batch_size_is_per_recipe_unless_overridden():
    teacher = study.RunSpec("teacher", "vit")
    assert study_runs._run_settings(StudyConfig(), teacher)["batch_size"] == study.TEACHER_BATCH_SIZE["vit"]
    convnext = study_runs._run_settings(StudyConfig(), study.RunSpec("teacher", "convnext"))
    assert convnext["batch_size"] == study.TEACHER_BATCH_SIZE["convnext"]
    assert study_runs._run_settings(StudyConfig(teacher_batch_size=32), teacher)["batch_size"] == 32


@pytest.mark.skipif(not HAVE_DATA, reason="apt-get install dataset-fashion-mnist")
def test_vit_sweep_trains_outside_the_validation_split_and_scores_it(tmp_path):
    spec = importlib.util.spec_from_file_location("vit_sweep", os.path.join(ROOT, "benchmarks", "vit_teacher_sweep.py"))
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    argv = ["--hidden", "16", "--layers", "1", "--epochs", "2", "--batch", "32", "--out", str(tmp_path)]
    result = sweep.main(argv + ["--max-train-images", "64", "--max-eval-images", "48"])
    assert result["train_images"] == 64 and result["val_images"] == 48 and len(result["val_curve"]) == 2
    assert all(0 <= v <= 1 for v in result["val_curve"]) and result["params"] < 20_000
    saved = json.loads((tmp_path / "h16-l1-b32-e2-p0-lr0.002.json").read_text())
    assert saved["val_curve"] == result["val_curve"]
