"""examples/run_image_classification_pat.py: CLI flags, YAML configs, imagefolder and saved datasets."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import timm
import torch
import yaml
from transformers import ViTImageProcessor

from support.tiny import make_image_dataset, tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "run_image_classification_pat.py")


def load_script():
    spec = importlib.util.spec_from_file_location("run_image_classification_pat", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tiny_teacher("vit", id2label={0: "cat", 1: "dog", 2: "bird"}).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    dataset = make_image_dataset(n=30)
    names = dataset.features["label"].names
    for split, rows in (("train", range(0, 24)), ("validation", range(24, 30))):
        for i in rows:
            example = dataset[i]
            folder = root / split / names[example["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            example["image"].save(folder / f"{i}.png")
    return root


def common_args(out, teacher_dir):
    return [
        "--teacher_name_or_path", teacher_dir,
        "--student_name", "test_resnet",
        "--student_kwargs", '{"img_size": 20}',
        "--output_dir", str(out),
        "--per_device_train_batch_size", "8",
        "--num_train_epochs", "1",
        "--report_to", "none",
        "--use_cpu", "true",
        "--disable_tqdm", "true",
        "--do_train", "--do_eval",
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["kd", "ofa", "pat", "pat_compiled"])
def test_imagefolder_run_exports_a_timm_student(script, teacher_dir, imagefolder, tmp_path, method):
    out = tmp_path / "run"
    extra = []
    if method == "pat_compiled":  # --torch_compile: the regions compiled (aot_eager: the graphs, without C++)
        method, extra = "pat", ["--torch_compile", "true", "--torch_compile_backend", "aot_eager"]
    if method == "pat":
        extra += ["--pat_dim", "32", "--pat_num_heads", "4", "--pat_prompt_stages", "1", "3"]
    data = ["--train_dir", str(imagefolder / "train"), "--validation_dir", str(imagefolder / "validation")]
    logging = ["--logging_steps", "1"]
    results = script.main(common_args(out, teacher_dir) + data + logging + ["--distill_method", method, *extra])
    assert "eval_accuracy" in results and "eval_loss_kd" in results
    history = json.load(open(out / "trainer_state.json"))["log_history"]
    expected = {"kd": "loss_kd", "ofa": "loss_ofa_s1", "pat": "loss_hcl"}[method]
    assert any(expected in h for h in history)
    config = json.load(open(out / "config.json"))
    # imagefolder sorts class folders by name; the teacher's classes are matched to them by name
    assert config["label_names"] == ["bird", "cat", "dog"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.num_classes == 3
    assert os.path.isfile(out / "eval_results.json") and os.path.isfile(out / "README.md")


def test_yaml_config_and_saved_dataset(script, teacher_dir, tmp_path):
    import datasets

    data_dir = tmp_path / "data"
    datasets.DatasetDict({"train": make_image_dataset(n=16), "test": make_image_dataset(n=6, seed=1)}).save_to_disk(
        str(data_dir)
    )
    out = tmp_path / "yaml-run"
    config = {
        "teacher_name_or_path": teacher_dir,
        "student_name": "test_vit",
        "student_kwargs": '{"img_size": 16}',
        "dataset_name": str(data_dir),
        "max_train_samples": 8,
        "distill_method": "kd",
        "temperature": 2.0,
        "output_dir": str(out),
        "do_train": True,
        "do_eval": True,
        "per_device_train_batch_size": 4,
        "num_train_epochs": 1,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    results = script.main([str(path)])
    assert results["epoch"] == 1.0
    state = json.load(open(out / "trainer_state.json"))
    assert state["global_step"] == 2  # 8 samples / batch 4
    assert "temperature: 2.0" in open(out / "README.md").read()


def test_missing_label_column_fails_before_training(script, teacher_dir, imagefolder, tmp_path):
    args = common_args(tmp_path / "bad", teacher_dir) + [
        "--train_dir",
        str(imagefolder / "train"),
        "--label_column_name",
        "target",
    ]
    with pytest.raises(ValueError, match=r"no column 'target'.*--label_column_name"):
        script.main(args)
    assert not os.path.exists(tmp_path / "bad" / "model.safetensors")


def test_no_arguments_means_the_builtin_default(script):
    model_args, data_args, training_args = script.parse_args([])
    assert data_args.dataset_name is None and data_args.train_dir is None  # built-in Fashion-MNIST
    assert model_args.teacher_name_or_path is None  # the demo teacher
    assert training_args.distill_method == "kd" and training_args.do_train and training_args.do_eval


def test_resume_from_last_checkpoint_is_detected(script, teacher_dir, imagefolder, tmp_path):
    out = tmp_path / "resume"
    args = common_args(out, teacher_dir) + [
        "--train_dir", str(imagefolder / "train"), "--validation_dir", str(imagefolder / "validation"),
        "--save_strategy", "epoch",
    ]  # fmt: skip
    script.main(args)
    assert os.path.isdir(out / "checkpoint-3")
    # Running again with more epochs continues from checkpoint-3 instead of starting over.
    script.main([a if a != "1" else "2" for a in args])
    state = json.load(open(out / "trainer_state.json"))
    assert state["global_step"] == 6
    assert torch.load(out / "training_args.bin", weights_only=False).num_train_epochs == 2


def test_config_file_then_flags_override_it(script, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {"distill_method": "kd", "num_train_epochs": 3, "output_dir": "a", "bf16": False, "report_to": ["none"]}
        )
    )
    _, _, args = script.parse_args([str(config), "--distill_method", "pat", "--output_dir", "b"])
    assert (args.distill_method, args.num_train_epochs, args.output_dir) == ("pat", 3.0, "b")
    with pytest.raises(ValueError, match="no_such_flag"):  # an unknown flag is refused, as without a file
        script.parse_args([str(config), "--no_such_flag", "1"])


def test_augmentation_is_one_config_and_gpu_loader_defaults_respect_given_flags(script, tmp_path):
    """The data arguments build one AugmentationConfig; the GPU data-loader defaults never override a setting the
    command line or the config file gave (and leave a CPU run alone)."""
    from pat_hf.data.augment import AugmentationConfig

    _, data_args, args = script.parse_args(
        [
            "--output_dir",
            str(tmp_path),
            "--auto_augment",
            "rand-m9-mstd0.5-inc1",
            "--re_prob",
            "0.25",
            "--use_cpu",
            "true",
        ]
    )
    assert data_args.augmentation == AugmentationConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "dataloader_pin_memory": False}))
    given = script.given_arguments([str(config), "--dataloader_num_workers=3", "--seed", "1"])
    assert given == {"output_dir", "dataloader_pin_memory", "dataloader_num_workers", "seed"}
    workers = args.dataloader_num_workers
    script.gpu_loader_defaults(args, set(), gpus=2, cpus=16)
    assert args.dataloader_num_workers == workers  # --use_cpu: unchanged
    _, _, gpu_args = script.parse_args(["--output_dir", str(tmp_path), "--dataloader_pin_memory", "false"])
    gpu_args.use_cpu = False
    script.gpu_loader_defaults(gpu_args, {"dataloader_pin_memory"}, gpus=2, cpus=16)
    assert gpu_args.dataloader_num_workers == 8 and gpu_args.dataloader_persistent_workers  # 16 cores, 2 GPUs
    assert not gpu_args.dataloader_pin_memory and not gpu_args.accelerator_config.non_blocking  # given: kept
    _, _, gpu_args = script.parse_args(["--output_dir", str(tmp_path), "--dataloader_num_workers", "0"])
    gpu_args.use_cpu = False
    script.gpu_loader_defaults(gpu_args, {"dataloader_num_workers"}, gpus=4, cpus=12)
    assert gpu_args.dataloader_num_workers == 0 and gpu_args.dataloader_pin_memory
    assert gpu_args.accelerator_config.non_blocking


def test_a_gpu_run_without_loader_workers_is_warned():
    from pat_hf.training.trainer import single_process_loading_warning

    assert "dataloader_num_workers=0 on a GPU" in single_process_loading_warning(0, "cuda")
    assert single_process_loading_warning(4, "cuda") is None and single_process_loading_warning(0, "cpu") is None


@pytest.mark.slow
def test_a_method_written_outside_the_package_trains_through_the_script_and_exports(teacher_dir, imagefolder, tmp_path):
    """examples/custom_method.py, loaded by --method_module in a fresh process (so this process's registry, and
    the docs' table of methods, stay as they are): it registers, trains, logs its parts and exports the student
    alone."""
    import subprocess

    out = tmp_path / "custom"
    data = ["--train_dir", str(imagefolder / "train"), "--validation_dir", str(imagefolder / "validation")]
    argv = common_args(out, teacher_dir) + data + ["--logging_steps", "1", "--save_strategy", "epoch"]
    argv += ["--method_module", os.path.join(ROOT, "examples", "custom_method.py")]
    argv += ["--distill_method", "cosine_embedding"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, SCRIPT, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.load(open(out / "trainer_state.json"))["log_history"]
    steps = [h for h in history if "loss_cosine" in h]
    assert steps and all(0 <= h["loss_cosine"] <= 2 and "loss_kd" in h and "loss_ce" in h for h in steps)
    manifest = json.load(open(out / "checkpoint-3" / "distill_manifest.json"))
    assert manifest["method"]["method"] == "cosine_embedding"
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert model.num_classes == 3
    from safetensors.torch import load_file

    exported = load_file(os.path.join(out, "model.safetensors"))
    assert set(exported) == set(model.state_dict()) and not any("projection" in k for k in exported)


def test_method_module_flags_are_found_before_parsing(script):
    assert script._method_modules_in(["--a", "1", "--method_module", "x.py", "y.py", "--b"]) == ["x.py", "y.py"]
    assert script._method_modules_in(["--method_module=z.py"]) == ["z.py"]
    with pytest.raises(ValueError, match="no such file"):
        script.import_method_modules(["/nonexistent/method.py"])
