"""Every YAML in examples/configs applies its full recipe (docs: pat_method.md §4, examples/configs/README.md).

Each config runs through the example script for one optimizer step with tiny models and data substituted (its
recipe untouched): the test checks the parsed recipe, then what the trainer built from it: timm augmentation on both
views, Mixup / CutMix, the model EMA, the weight-decay groups and the timm schedule.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch
from transformers import ViTImageProcessor

from pat_hf import PATDistillationTrainer
from pat_hf.data.mixup import PairedMixup
from support.tiny import make_image_dataset, tiny_teacher
from test_example_script import load_script

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "configs", "*.yaml")))
VIT_AUGMENT = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "color_jitter": 0.4,
    "re_prob": 0.25,
    "re_mode": "pixel",
    "train_interpolation": "random",
}
VIT_MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5, "mixup_mode": "batch"}
CNN_AUGMENT = {"auto_augment": None, "re_prob": 0.0, "train_interpolation": "random", "color_jitter": 0.0}
NO_MIX = {"mixup_alpha": 0.0, "cutmix_alpha": 0.0}
CIFAR_CNN = {
    "optim": "sgd",
    "learning_rate": 0.05,
    "weight_decay": 2e-3,
    "lr_schedule": "cosine",
    "min_lr": 1e-3,
    "warmup_epochs": 3,
    "warmup_lr": 1e-4,
    "max_grad_norm": 0.0,
    "model_ema_decay": 0.9998,
    "num_train_epochs": 300,
}
VIT = {
    "optim": "adamw_torch_fused",
    "learning_rate": 5e-4,
    "weight_decay": 0.05,
    "lr_schedule": "cosine",
    "warmup_epochs": 20,
    "warmup_lr": 5e-7,
    "max_grad_norm": 5.0,
    "num_train_epochs": 300,
}
# What pat_method.md §4 (and the official PAT / OFA-KD configs and commands) prescribe per file.
RECIPES = {
    "cifar100_swin_t_to_resnet18_kd": {**CIFAR_CNN, **CNN_AUGMENT, **NO_MIX},
    "cifar100_swin_t_to_resnet18_ofa": {**CIFAR_CNN, **CNN_AUGMENT, **NO_MIX},
    "cifar100_swin_t_to_resnet18_pat": {**CIFAR_CNN, **CNN_AUGMENT, **NO_MIX},
    "cifar100_vit_s_to_mobilenetv2_pat": {**CIFAR_CNN, **CNN_AUGMENT, **NO_MIX},
    "cifar100_convnext_t_to_deit_t_pat": {**VIT, **VIT_AUGMENT, **VIT_MIX, "min_lr": 1e-5, "model_ema_decay": 0.9998},
    "cifar100_convnext_t_to_resmlp_s12_pat": {
        **VIT,
        **VIT_AUGMENT,
        **VIT_MIX,
        "min_lr": 1e-5,
        "model_ema_decay": 0.9998,
    },
    # The baselines' recipes are their pair's (same student, same training), with the method's own settings.
    **{
        f"cifar100_{pair}_{method}": {**recipe, "distill_method": method}
        for pair, methods, recipe in [
            ("swin_t_to_resnet18", ("dkd", "dist", "fitnet"), {**CIFAR_CNN, **CNN_AUGMENT, **NO_MIX}),
            ("vit_s_to_mobilenetv2", ("fitnet",), {**CIFAR_CNN, **CNN_AUGMENT, **NO_MIX}),
            (
                "convnext_t_to_deit_t",
                ("fitnet",),
                {**VIT, **VIT_AUGMENT, **VIT_MIX, "min_lr": 1e-5, "model_ema_decay": 0.9998},
            ),
            (
                "convnext_t_to_resmlp_s12",
                ("dkd", "fitnet"),
                {**VIT, **VIT_AUGMENT, **VIT_MIX, "min_lr": 1e-5, "model_ema_decay": 0.9998},
            ),
        ]
        for method in methods
    },
    "imagenet_convnext_t_to_deit_t_pat": {**VIT, **VIT_AUGMENT, **VIT_MIX, "min_lr": 1e-6, "model_ema_decay": 0.99996},
    "imagenet_swin_t_to_resnet18_pat": {
        **CNN_AUGMENT,
        **NO_MIX,
        "optim": "sgd",
        "learning_rate": 0.1,
        "weight_decay": 1e-4,
        "lr_schedule": "step",
        "decay_epochs": 30,
        "decay_rate": 0.1,
        "warmup_epochs": 3,
        "warmup_lr": 1e-4,
        "max_grad_norm": 0.0,
        "model_ema_decay": 0.9998,
        "num_train_epochs": 100,
    },
}


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    teacher = root / "teacher"
    tiny_teacher("vit", id2label={0: "cat", 1: "dog", 2: "bird"}).save_pretrained(teacher)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(teacher)
    import datasets

    data = root / "data"
    datasets.DatasetDict(
        {"train": make_image_dataset(n=8, size=16), "validation": make_image_dataset(n=4, size=16, seed=1)}
    ).save_to_disk(str(data))
    return str(teacher), str(data), root


def test_every_config_is_covered():
    names = {os.path.basename(c)[: -len(".yaml")] for c in CONFIGS}
    assert names == set(RECIPES) | {"default"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.basename(c))
def test_config_builds_and_trains_one_step_with_its_recipe(script, tiny_run, config, monkeypatch):
    name = os.path.basename(config)[: -len(".yaml")]
    teacher, data, root = tiny_run
    _, data_args, args = script.parse_args([config, "--bf16", "false", "--use_cpu", "true"])  # as read, on a CPU
    recipe = RECIPES.get(name, {})
    parsed = {**vars(data_args), **{k: getattr(args, k) for k in dir(args) if not k.startswith("_")}}
    for key, value in recipe.items():
        got = parsed[key]
        got = str(getattr(got, "value", got)) if key == "optim" else got
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (name, key, got)
    if name != "default":
        assert args.model_ema and args.export_weights == "auto" and args.label_smoothing == 0.1
        assert not args.warmup_steps

    built: list[PATDistillationTrainer] = []

    class Recording(PATDistillationTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    monkeypatch.setattr(script, "PATDistillationTrainer", Recording)
    student = "test_vit" if "deit" in name or "resmlp" in name else "test_resnet"
    overrides = [
        "--teacher_name_or_path", teacher, "--student_name", student, "--student_kwargs", '{"img_size": 16}',
        "--dataset_name", data, "--image_column_name", "image", "--label_column_name", "label",
        "--output_dir", str(root / name), "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--bf16", "false", "--use_cpu", "true", "--report_to", "none",
        "--dataloader_num_workers", "0", "--pat_dim", "16", "--pat_num_queries", "16", "--pat_num_heads", "2",
        "--optim", "sgd" if args.optim.value == "sgd" else "adamw_torch", "--disable_tqdm", "true",
    ]  # fmt: skip
    results = script.main([config, *overrides])
    (trainer,) = built
    assert trainer.state.global_step == 1

    # Augmentation: timm's pipeline, one uint8 image for both views, the recipe's settings in one object.
    example = trainer.train_dataset[0]
    assert example["pixel_values"].shape == (3, 16, 16) and example["pixel_values"].dtype == torch.uint8
    augmentation = trainer.augmentation
    for key in ("auto_augment", "re_prob", "re_mode", "color_jitter", "min_crop_scale"):
        if key in recipe:
            value = recipe[key]
            assert getattr(augmentation, key) == (pytest.approx(value) if isinstance(value, float) else value), key
    # Mixup / CutMix with the recipe's label smoothing, applied once by timm.
    if recipe.get("mixup_alpha"):
        assert isinstance(trainer.mixup, PairedMixup)
        assert (trainer.mixup.mixup_alpha, trainer.mixup.cutmix_alpha, trainer.mixup.label_smoothing) == (0.8, 1.0, 0.1)
    else:
        assert trainer.mixup is None
    # EMA of the student, evaluated.
    if name != "default":
        assert trainer.model_ema.decay == recipe["model_ema_decay"] and trainer.model_ema.module is not None
        assert "eval_ema_accuracy" in results and trainer.exported_weights() == "ema"
    # Decay groups: 1-D parameters and no_weight_decay() without decay, the rest with the recipe's.
    decays = sorted(g["weight_decay"] for g in trainer.optimizer.param_groups)
    assert decays == [0.0, args.weight_decay]
    # The timm schedule, per epoch: 2 steps per epoch here, so the next step (1) is still in epoch 0 of the
    # warm-up and runs at warmup_lr.
    if args.lr_schedule:
        assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
        assert trainer.lr_scheduler.get_last_lr() == pytest.approx([args.warmup_lr] * 2)
