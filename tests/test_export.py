"""The exported student loads without pat_hf through timm, AutoModel and pipeline, with identical outputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from support.tiny import CLASS_NAMES, make_image_dataset, tiny_args, tiny_teacher


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export")
    dataset = make_image_dataset()
    student = create_student(
        "test_vit",
        num_classes=3,
        img_size=16,
        pretrained_cfg_overlay={"crop_pct": 1.0, "mean": (0.4,) * 3, "std": (0.3,) * 3},
    )
    teacher = tiny_teacher("convnext")
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=tiny_args(tmp_path, distill_method="kd", num_train_epochs=2, eval_strategy="epoch"),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
        eval_dataset=with_image_transforms(dataset, view, None, train=False),
    )
    trainer.train()
    trainer.save_model()
    return trainer


def test_export_holds_only_the_student_in_timm_layout(trained):
    out = trained.args.output_dir
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(out))
    assert "preprocessor_config.json" not in os.listdir(out)  # never the teacher's processor
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architecture"] == "test_vit"
    assert config["num_classes"] == 3
    assert config["label_names"] == CLASS_NAMES
    cfg = config["pretrained_cfg"]
    assert list(cfg["input_size"]) == [3, 16, 16]
    assert cfg["mean"] == [0.4] * 3 and cfg["std"] == [0.3] * 3 and cfg["crop_pct"] == 1.0
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert set(weights) == set(trained.student.state_dict())


def test_export_reloads_with_timm_identically(trained):
    model = timm.create_model(f"local-dir:{trained.args.output_dir}", pretrained=True).eval()
    student = trained.student.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), student(x))


def test_export_reloads_with_automodel_identically(trained):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(trained.args.output_dir).eval()
    assert [model.config.id2label[i] for i in range(3)] == CLASS_NAMES
    student = trained.student.eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, student(x))


def test_export_works_in_pipeline_with_the_students_preprocessing(trained):
    from transformers import pipeline

    classifier = pipeline("image-classification", model=trained.args.output_dir)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    # The same image through timm's own transform for the student.
    student = trained.student.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=student))
    with torch.no_grad():
        probs = student(transform(image).unsqueeze(0)).softmax(-1)[0]
    expected = {CLASS_NAMES[i]: probs[i].item() for i in range(3)}
    got = {p["label"]: p["score"] for p in predictions}
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name] == pytest.approx(expected[name], abs=1e-4)


def test_model_card_names_teacher_method_data_and_metrics(trained):
    card = open(os.path.join(trained.args.output_dir, "README.md")).read()
    assert "library_name: timm" in card and "pipeline_tag: image-classification" in card
    assert "knowledge-distillation" in card and "- kd" in card
    assert "ConvNextForImageClassification" in card  # the teacher
    assert "eval_accuracy" in card
    assert 'timm.create_model("hf-hub:' in card and "AutoModelForImageClassification" in card
    # The training augmentation (AugmentationConfig.describe()).
    assert "- augmentation: crop scale 0.08-1 ratio 0.75-1.33 (bilinear), hflip 0.5, seeded per sample" in card


def test_checkpoint_holds_student_and_manifest(tmp_path):
    dataset = make_image_dataset()
    student = create_student("test_resnet", num_classes=3, img_size=20)
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher("vit"),
        args=tiny_args(tmp_path, distill_method="kd", save_strategy="steps", save_steps=2),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
    )
    trainer.train()
    ckpt = os.path.join(trainer.args.output_dir, "checkpoint-2")
    files = set(os.listdir(ckpt))
    assert {
        "model.safetensors",
        "config.json",
        "distill_manifest.json",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
    } <= files
    assert any(f.startswith("rng_state") for f in files)
    manifest = json.load(open(os.path.join(ckpt, "distill_manifest.json")))
    assert manifest["method"]["method"] == "kd" and manifest["method"]["temperature"] == 4.0
    assert manifest["teacher"]["architecture"] == "ViTForImageClassification"
    assert manifest["teacher"]["fingerprint"] == trainer.teacher.fingerprint()
    # The checkpoint's weights are a loadable timm student too (no teacher, no 'student.' prefix).
    assert set(load_file(os.path.join(ckpt, "model.safetensors"))) == set(student.state_dict())


# ---- students built from their timm class with their own arguments ------------------------------------------

MIXER = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "num_blocks": 2}


def test_an_entrypoint_that_fixes_an_argument_gets_a_message_naming_the_class():
    with pytest.raises(ValueError, match=r"(?s)fixes 'patch_size'.*model_class='timm.models.mlp_mixer.MlpMixer'"):
        create_student("mixer_s16_224", num_classes=3, **MIXER)


def _distil_and_export(tmp_path, student, **trainer_kwargs):
    dataset = make_image_dataset(n=8, size=16)
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher("vit"),
        args=tiny_args(tmp_path, distill_method="kd", max_steps=1),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
        **trainer_kwargs,
    )
    trainer.train()
    trainer.save_model()
    return trainer


def _load_as_the_model_card_says(folder):
    """The snippet of the model card of a class-built student: timm, safetensors and the standard library only."""
    import importlib

    config = json.load(open(os.path.join(folder, "config.json")))
    module, name = config["model_class"].rsplit(".", 1)
    model_class = getattr(importlib.import_module(module), name)
    model = model_class(**config.get("model_args", {}), num_classes=config["num_classes"])
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
    return model.eval()


@pytest.mark.parametrize("how", ["create_student", "build_model_with_cfg"])
def test_a_class_built_student_exports_a_model_that_reloads(tmp_path, how):
    from timm.models import build_model_with_cfg
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    if how == "create_student":
        student = create_student("mixer_s16_224", num_classes=3, model_class=MlpMixer, **MIXER)
        trainer = _distil_and_export(tmp_path, student)
    else:  # built by hand: the arguments come with student_model_args
        student = build_model_with_cfg(MlpMixer, "mixer_s16_224", pretrained=False, num_classes=3, **MIXER)
        trainer = _distil_and_export(tmp_path, student, student_model_args=dict(MIXER))
    out = trainer.args.output_dir
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_class"] == "timm.models.mlp_mixer.MlpMixer"
    card = open(os.path.join(out, "README.md")).read()
    assert "model_class" in card and "timm.create_model" in card and "pretrained=True).eval()" not in card
    model = _load_as_the_model_card_says(out)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.student.eval()(x), rtol=0, atol=1e-6)


def test_a_class_built_student_without_its_arguments_is_refused_before_training(tmp_path):
    from timm.models import build_model_with_cfg
    from timm.models.mlp_mixer import MlpMixer

    student = build_model_with_cfg(MlpMixer, "mixer_s16_224", pretrained=False, num_classes=3, **MIXER)
    with pytest.raises(ValueError, match=r"(?s)would not load back.*student_model_args="):
        _distil_and_export(tmp_path, student)
    assert not os.path.exists(tmp_path / "out")


def test_a_class_built_student_whose_entrypoint_takes_the_arguments_reloads_with_timm(tmp_path):
    from timm.models import build_model_with_cfg
    from timm.models.vision_transformer import VisionTransformer

    args = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    student = build_model_with_cfg(VisionTransformer, "vit_tiny_patch16_224", pretrained=False, num_classes=3, **args)
    trainer = _distil_and_export(tmp_path, student, student_model_args=args)
    config = json.load(open(os.path.join(trainer.args.output_dir, "config.json")))
    assert "model_class" not in config  # timm's registry rebuilds it
    model = timm.create_model(f"local-dir:{trainer.args.output_dir}", pretrained=True).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.student.eval()(x), rtol=0, atol=1e-6)
