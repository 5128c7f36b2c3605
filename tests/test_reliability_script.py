"""The example script with bad input: every error comes before long work (the output folder and the teacher
before the data is read) and names the problem; nothing in the way is ever overwritten."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import datasets
import pytest
import yaml
from transformers import ViTImageProcessor

from pat_hf.checkpoint_integrity import verify_checkpoint
from pat_hf.errors import (
    ConfigValueError,
    DatasetError,
    ImageLoadError,
    LabelError,
    OutputDirError,
    RunLockedError,
    TeacherLoadError,
)
from pat_hf.training.output_dir import LOCK_NAME
from support.files import folder_hashes, truncate
from support.tiny import make_image_dataset, tiny_teacher

SCRIPT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "run_image_classification_pat.py"
)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("run_image_classification_pat_reliability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def save_teacher(path, id2label=None, processor=True):
    tiny_teacher("vit", id2label=id2label).save_pretrained(path)
    if processor:
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


@pytest.fixture
def teacher_dir(tmp_path):
    return save_teacher(tmp_path / "teacher", id2label={0: "cat", 1: "dog", 2: "bird"})


def saved_dataset(path, labels=None, feature=None, n=12):
    base = make_image_dataset(n=n, size=16)
    if labels is not None:
        features = datasets.Features({"image": datasets.Image(), "label": feature or datasets.Value("int64")})
        base = datasets.Dataset.from_dict({"image": list(base["image"]), "label": labels}, features=features)
    datasets.DatasetDict({"train": base, "validation": base.select(range(min(6, n)))}).save_to_disk(str(path))
    return str(path)


def args_for(out, teacher, data, *extra):
    return [
        "--teacher_name_or_path", str(teacher),
        "--student_name", "test_resnet",
        "--student_kwargs", '{"img_size": 16}',
        "--dataset_name", str(data),
        "--output_dir", str(out),
        "--per_device_train_batch_size", "4",
        "--max_steps", "2",
        "--report_to", "none",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--do_train", "--do_eval",
        *extra,
    ]  # fmt: skip


# ---- the output folder, before anything is loaded -------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]])
def test_output_dir_set_to_the_teachers_folder_is_refused_and_untouched(script, tmp_path, teacher_dir, overwrite):
    before = folder_hashes(teacher_dir)
    # The data does not exist: the refusal comes before the data is read.
    with pytest.raises(
        OutputDirError, match=r"is the folder a model is loaded from .* whatever overwrite_output_dir says"
    ):
        script.main(args_for(teacher_dir, teacher_dir, tmp_path / "no-data", *overwrite))
    assert folder_hashes(teacher_dir) == before


def test_output_dir_holding_a_model_is_refused_unless_overwrite(script, tmp_path, teacher_dir):
    out = save_teacher(tmp_path / "someone-elses-model", processor=False)
    before = folder_hashes(out)
    with pytest.raises(
        OutputDirError, match=r"holds a model \(config.json, model.safetensors\) not written by a pat_hf run"
    ):
        script.main(args_for(out, teacher_dir, tmp_path / "no-data"))
    assert folder_hashes(out) == before
    data = saved_dataset(tmp_path / "data")
    script.main(args_for(out, teacher_dir, data, "--overwrite_output_dir"))
    assert json.load(open(out / "config.json"))["architecture"] == "test_resnet"


def test_a_run_in_progress_in_the_output_dir_is_refused_before_the_data_is_read(script, tmp_path, teacher_dir):
    import socket

    out = tmp_path / "busy"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": 0}))  # init: alive
    with pytest.raises(RunLockedError, match="Another run is training in"):
        script.main(args_for(out, teacher_dir, tmp_path / "no-data"))


# ---- the teacher, through pat_hf.load_teacher, before the data ---------------------------------------------------


def test_a_teacher_without_preprocessor_config_falls_back_to_its_config(script, tmp_path, caplog):
    teacher = save_teacher(tmp_path / "bare-teacher", id2label={0: "cat", 1: "dog", 2: "bird"}, processor=False)
    results = script.main(args_for(tmp_path / "out", teacher, saved_dataset(tmp_path / "data")))
    assert "eval_accuracy" in results
    assert "No image processor for the teacher: assuming 16x16" in caplog.text


@pytest.mark.parametrize(
    ("how", "pattern"),
    [
        ("missing", r"no-such-teacher': no such folder"),
        ("corrupt config", r"config.json is not valid JSON"),
        ("truncated weights", r"model.safetensors is truncated"),
        ("text model", r"BertForSequenceClassification \(bert\), not an image classifier"),
    ],
)
def test_a_broken_teacher_is_named_before_the_data_is_read(script, tmp_path, teacher_dir, how, pattern):
    if how == "missing":
        teacher = tmp_path / "no-such-teacher"
    elif how == "corrupt config":
        (teacher_dir / "config.json").write_text("{,}")
        teacher = teacher_dir
    elif how == "truncated weights":
        truncate(teacher_dir / "model.safetensors")
        teacher = teacher_dir
    else:
        from transformers import BertConfig, BertForSequenceClassification

        teacher = tmp_path / "bert"
        config = BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=50
        )
        BertForSequenceClassification(config).save_pretrained(teacher)
    with pytest.raises(TeacherLoadError, match=pattern):
        script.main(args_for(tmp_path / "out", teacher, tmp_path / "no-data"))
    assert not (tmp_path / "out").exists()


# ---- labels ---------------------------------------------------------------------------------------------------


def test_one_based_labels_are_refused_before_training(script, tmp_path, teacher_dir):
    data = saved_dataset(tmp_path / "data", labels=[1, 2, 3] * 4)
    with pytest.raises(LabelError, match=r"go up to 3, but there are 3 classes .*look 1-based"):
        script.main(args_for(tmp_path / "out", teacher_dir, data))
    assert not (tmp_path / "out" / "checkpoint-1").exists() and not (tmp_path / "out" / "model.safetensors").exists()


def test_string_labels_named_as_the_teachers_classes_train(script, tmp_path, teacher_dir):
    data = saved_dataset(tmp_path / "data", labels=["Cat", "dog", "BIRD"] * 4, feature=datasets.Value("string"))
    script.main(args_for(tmp_path / "out", teacher_dir, data))
    assert json.load(open(tmp_path / "out" / "config.json"))["label_names"] == ["cat", "dog", "bird"]


def test_string_labels_with_a_teacher_without_names_use_the_sorted_names(script, tmp_path, caplog):
    teacher = save_teacher(tmp_path / "unnamed-teacher")
    data = saved_dataset(tmp_path / "data", labels=["cat", "dog", "bird"] * 4, feature=datasets.Value("string"))
    script.main(args_for(tmp_path / "out", teacher, data))
    assert json.load(open(tmp_path / "out" / "config.json"))["label_names"] == ["bird", "cat", "dog"]
    assert "sorted unique names ['bird', 'cat', 'dog']" in caplog.text


# ---- data and arguments -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "pattern"),
    [
        (["--max_eval_samples", "0"], r"--max_eval_samples must be at least 1"),
        (["--max_train_samples", "0"], r"--max_train_samples must be at least 1"),
        (["--temperature", "inf"], r"temperature must be > 0 and finite"),
        (["--divergence_factor", "-1"], r"divergence_factor must be >= 0"),
    ],
)
def test_out_of_range_flags_are_refused(script, tmp_path, teacher_dir, flags, pattern):
    with pytest.raises(ValueError, match=pattern):
        script.main(args_for(tmp_path / "out", teacher_dir, tmp_path / "no-data", *flags))


def test_bad_student_kwargs_json_names_the_flag(script, tmp_path, teacher_dir):
    args = args_for(tmp_path / "out", teacher_dir, tmp_path / "no-data")
    args[args.index("--student_kwargs") + 1] = "{img_size: 16}"
    with pytest.raises(ValueError, match=r"--student_kwargs must be a JSON object .*got '\{img_size: 16\}'"):
        script.main(args)


def test_an_empty_split_is_refused(script, tmp_path, teacher_dir, monkeypatch):
    base = make_image_dataset(n=6, size=16)
    # (datasets cannot load_from_disk an empty saved split: the data arrives empty some other way, e.g. filtered)
    monkeypatch.setattr(
        script, "load_data", lambda *a: datasets.DatasetDict({"train": base.select([]), "validation": base})
    )
    with pytest.raises(DatasetError, match=r"'train' split is empty \(0 rows\)"):
        script.main(args_for(tmp_path / "out", teacher_dir, tmp_path / "data"))


def test_a_truncated_image_names_its_file(script, tmp_path, teacher_dir):
    for i, image in enumerate(make_image_dataset(n=12, size=16)["image"]):
        folder = tmp_path / "images" / ["cat", "dog", "bird"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    truncate(tmp_path / "images" / "dog" / "4.png", 0.3)
    args = args_for(tmp_path / "out", teacher_dir, "x", "--train_val_split", "0.25", "--max_steps", "3")
    args = [a for a in args if a not in ("--dataset_name", "x")] + ["--train_dir", str(tmp_path / "images")]
    with pytest.raises(ImageLoadError, match=r"Cannot read the image in file '.*dog/4.png'"):
        script.main(args)


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"temperature": "hot"}, r"run.yaml: 'temperature' must be a number or None, got 'hot' \(str\)"),
        ({"per_device_train_batch_size": [8, 16]}, r"'per_device_train_batch_size' must be an integer, got \[8, 16\]"),
        ({"temprature": 2.0}, r"unknown argument 'temprature'. Did you mean 'temperature'"),
        ({"do_train": "maybe"}, r"'do_train' must be true or false, got 'maybe'"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_named(script, tmp_path, values, pattern):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **values}))
    with pytest.raises(ConfigValueError, match=pattern):
        script.parse_args([str(path)])
    with pytest.raises(ConfigValueError, match=pattern):  # with flags after the file too
        script.parse_args([str(path), "--seed", "1"])


def test_yaml_numbers_written_as_strings_are_read_and_broken_yaml_is_named(script, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: out\nlearning_rate: 1e-3\nper_device_train_batch_size: 8.0\nreport_to: none\n")
    _, _, args = script.parse_args([str(path)])
    assert args.learning_rate == 0.001 and args.per_device_train_batch_size == 8
    path.write_text("output_dir: [out\n")
    with pytest.raises(ConfigValueError, match=r"run.yaml is not valid YAML"):
        script.parse_args([str(path)])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigValueError, match="must hold a mapping"):
        script.parse_args([str(path)])


@pytest.mark.slow
def test_auto_resume_skips_a_broken_latest_checkpoint(script, tmp_path, teacher_dir, caplog):
    data = saved_dataset(tmp_path / "data", n=16)
    out = tmp_path / "out"
    args = args_for(out, teacher_dir, data, "--save_strategy", "steps", "--save_steps", "2")
    args[args.index("--max_steps") + 1] = "4"
    script.main(args)
    truncate(out / "checkpoint-4" / "optimizer.pt")
    args[args.index("--max_steps") + 1] = "6"
    script.main(args)  # detects the checkpoints, resumes from checkpoint-2
    assert "Not resuming from" in caplog.text and "optimizer.pt" in caplog.text
    assert json.load(open(out / "trainer_state.json"))["global_step"] == 6
    assert verify_checkpoint(str(out / "checkpoint-4")) == []  # written again, whole
