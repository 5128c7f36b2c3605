"""PATDistillationTrainer end to end on tiny models: methods, families, logging, freezing, accumulation."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import ViTImageProcessor

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.models.teacher import load_teacher
from support.tiny import CLASS_NAMES, TEACHER_FAMILIES, make_image_dataset, tiny_args, tiny_teacher


def small_processor(size: int = 24) -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.4] * 3, image_std=[0.3] * 3)


def teacher_processor_for(family: str):
    # Families whose config has no image size would default to 224: keep the tests fast.
    return small_processor() if family in ("resnet", "timm_wrapper") else None


def build(tmp_path, teacher, student, method="kd", teacher_processor=None, dataset=None, **arg_overrides):
    dataset = dataset if dataset is not None else make_image_dataset()
    view = ImageView.from_timm(student)
    teacher_view = None
    if method != "none":
        teacher_view = load_teacher(teacher, image_processor=teacher_processor).view
    train = with_image_transforms(dataset, view, teacher_view, train=True)
    evaluation = with_image_transforms(dataset, view, None, train=False)
    args = tiny_args(tmp_path, distill_method=method, **arg_overrides)
    return PATDistillationTrainer(
        model=student,
        teacher=teacher if method != "none" else None,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        teacher_image_processor=teacher_processor,
    )


def record_input_shape(module: torch.nn.Module, seen: dict) -> torch.utils.hooks.RemovableHandle:
    def hook(mod, args, kwargs):
        seen["shape"] = tuple(kwargs["pixel_values"].shape)

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", TEACHER_FAMILIES)
def test_kd_trains_student_with_each_teacher_family(tmp_path, family):
    teacher = tiny_teacher(family)
    student = create_student("test_resnet", num_classes=3, img_size=20)
    before_teacher = snapshot(teacher)
    before_student = snapshot(student)
    trainer = build(tmp_path, teacher, student, "kd", teacher_processor_for(family), num_train_epochs=2)
    trainer.train()

    # The student learned, the teacher did not move and stayed in eval mode.
    assert any(not torch.equal(before_student[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(before_teacher[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    # The teacher is in neither the optimizer nor the trainable wrapper.
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not any(k.startswith("teacher") for k in trainer.model.state_dict())
    # Every loss component reaches the logs.
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert train_logs and all("loss_ce" in h and "loss_kd" in h for h in train_logs)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_loss_ce", "eval_loss_kd", "eval_accuracy"} <= set(metrics)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "student_name,kwargs",
    [
        ("test_resnet", {"img_size": 20}),
        ("test_vit", {"img_size": 16}),
        ("test_convnext", {"img_size": 32}),
        ("test_efficientnet", {"img_size": 24}),
        ("mixer_s32_224", {"img_size": 64}),
    ],
)
def test_kd_trains_each_student_family(tmp_path, student_name, kwargs):
    student = create_student(student_name, num_classes=3, **kwargs)
    trainer = build(tmp_path, tiny_teacher("vit"), student, "kd")
    before = snapshot(student)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if v.is_floating_point())


def test_none_method_needs_no_teacher_and_logs_ce_only(tmp_path):
    student = create_student("test_resnet", num_classes=3, img_size=20)
    trainer = build(tmp_path, None, student, "none")
    assert trainer.teacher is None
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("loss_ce" in h and "loss_kd" not in h for h in logs)
    metrics = trainer.evaluate()
    assert "eval_loss_ce" in metrics and "eval_loss_kd" not in metrics


def test_none_method_trains_a_transformers_model_and_exports_it(tmp_path):
    """How teachers are trained: a transformers classifier as the model with distill_method='none'."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = tiny_teacher("vit")
    processor = small_processor(16)
    dataset = make_image_dataset()
    view = ImageView.from_image_processor(processor)
    trainer = PATDistillationTrainer(
        model=model,
        args=tiny_args(tmp_path, distill_method="none"),
        train_dataset=with_image_transforms(dataset, view, train=True),
        processing_class=processor,
    )
    trainer.train()
    trainer.save_model()
    out = trainer.args.output_dir
    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    assert reloaded.config.id2label == dict(enumerate(CLASS_NAMES))
    assert AutoImageProcessor.from_pretrained(out).size == {"height": 16, "width": 16}
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(reloaded(pixel_values=x).logits, model(pixel_values=x).logits)


def test_teacher_sees_its_own_view_and_dataset_order(tmp_path):
    """Teacher classes named in another order are matched by name; its inputs use its own size/normalisation."""
    names = {0: "bird", 1: "cat", 2: "dog"}
    teacher = tiny_teacher("vit", id2label=names)
    student = create_student("test_resnet", num_classes=3, img_size=20)
    trainer = build(tmp_path, teacher, student, "kd")
    assert trainer.teacher.class_index.tolist() == [1, 2, 0]  # cat, dog, bird in dataset order
    seen = {}
    handle = record_input_shape(teacher, seen)
    trainer.train()
    handle.remove()
    assert tuple(seen["shape"][-2:]) == (16, 16)
    x = torch.randn(2, 3, 16, 16)
    raw = teacher(pixel_values=x).logits
    torch.testing.assert_close(trainer.teacher(x.to(trainer.args.device)), raw[:, [1, 2, 0]])


def test_teacher_inputs_derived_on_device_when_batch_has_only_student_view(tmp_path):
    teacher = tiny_teacher("vit")
    student = create_student("test_resnet", num_classes=3, img_size=20)
    dataset = make_image_dataset()
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=tiny_args(tmp_path, distill_method="kd"),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
    )
    seen = {}
    record_input_shape(teacher, seen)
    trainer.train()
    assert tuple(seen["shape"][-2:]) == (16, 16)


def test_teacher_stays_in_eval_mode_even_if_switched_to_train(tmp_path):
    teacher = tiny_teacher("resnet")
    student = create_student("test_resnet", num_classes=3, img_size=20)
    trainer = build(tmp_path, teacher, student, "kd", small_processor())
    stats_before = teacher.resnet.embedder.embedder.normalization.running_mean.clone()
    teacher.train()  # a careless callback: BN statistics must still not move
    trainer.train()
    assert not teacher.training
    torch.testing.assert_close(teacher.resnet.embedder.embedder.normalization.running_mean, stats_before)


def test_gradient_accumulation_matches_larger_batch(tmp_path):
    """GA 2 x batch 4 gives the same update as batch 8 (student without batch statistics)."""
    dataset = make_image_dataset(n=16)
    results = []
    for bs, ga in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        student = create_student("test_vit", num_classes=3, img_size=16)
        teacher = tiny_teacher("vit")
        trainer = build(
            tmp_path / f"bs{bs}",
            teacher,
            student,
            "kd",
            dataset=dataset,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=ga,
            max_steps=2,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
        )
        # Same augmentation draws for both runs: disable randomness in the transforms.
        trainer.train_dataset = with_image_transforms(
            dataset, ImageView.from_timm(student), trainer.teacher.view, train=False
        )
        trainer.train()
        results.append(snapshot(student))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-5, msg=key)


def test_grey_and_rgba_images_are_converted(tmp_path):
    for mode in ("L", "RGBA"):
        student = create_student("test_resnet", num_classes=3, img_size=20)
        trainer = build(tmp_path / mode, tiny_teacher("vit"), student, "kd", dataset=make_image_dataset(mode=mode))
        trainer.train()
        assert trainer.state.global_step == 3


def test_unlabelled_kd_uses_only_the_kd_term(tmp_path):
    dataset = make_image_dataset().remove_columns("label")
    student = create_student("test_resnet", num_classes=3, img_size=20)
    teacher = tiny_teacher("vit")
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=tiny_args(tmp_path, distill_method="kd"),
        train_dataset=with_image_transforms(dataset, view, load_teacher(teacher).view, train=True, label_column=None),
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("loss_kd" in h and "loss_ce" not in h for h in logs)


def test_student_given_by_name_gets_the_dataset_classes(tmp_path):
    dataset = make_image_dataset()
    teacher = tiny_teacher("vit")
    trainer = PATDistillationTrainer(
        model="test_resnet",
        teacher=teacher,
        args=tiny_args(tmp_path, distill_method="kd"),
        train_dataset=dataset,
    )
    assert trainer.student.num_classes == 3
    assert trainer.class_names == CLASS_NAMES


def test_loss_parts_reach_trainer_state_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    student = create_student("test_resnet", num_classes=3, img_size=20)
    trainer = build(
        tmp_path,
        tiny_teacher("vit"),
        student,
        "kd",
        report_to=["tensorboard"],
        eval_strategy="epoch",
        save_strategy="epoch",
    )
    trainer.train()
    with open(os.path.join(trainer.args.output_dir, "checkpoint-3", "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    assert any("loss_kd" in h for h in history) and any("eval_loss_kd" in h for h in history)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = [root for root, _, files in os.walk(trainer.args.output_dir) if any("tfevents" in f for f in files)]
    assert event_dirs
    tags = set()
    for d in event_dirs:
        acc = EventAccumulator(d)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss_ce", "train/loss_kd", "eval/loss_kd", "eval/accuracy"} <= tags


def test_bf16_reaches_the_teacher_forward(tmp_path):
    """Mixed precision covers the teacher too: it runs inside the prepared wrapper's autocast."""
    teacher = tiny_teacher("vit")
    student = create_student("test_resnet", num_classes=3, img_size=20)
    dtypes = set()
    teacher.classifier.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    trainer = build(tmp_path, teacher, student, "kd", bf16=True, max_steps=2)
    result = trainer.train()
    assert dtypes == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # weights untouched, compute in bf16


@pytest.mark.parametrize("how", ["args", "accelerate_launch_env"])
def test_bf16_pat_runs_both_teacher_passes_in_bf16(tmp_path, monkeypatch, how):
    """PAT's plain and prompted teacher passes run in bf16, from --bf16 or from `accelerate launch
    --mixed_precision bf16` (which sets ACCELERATE_MIXED_PRECISION), and every loss part stays finite."""
    if how == "accelerate_launch_env":
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    teacher = tiny_teacher("vit")
    student = create_student("test_resnet", num_classes=3, img_size=20)
    dtypes = []
    teacher.classifier.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    trainer = build(tmp_path, teacher, student, "pat", bf16=how == "args", max_steps=2, pat_dim=16, pat_num_queries=16)
    dtypes.clear()  # building PAT probes the teacher's stage shapes once, outside training
    trainer.train()
    assert len(dtypes) == 4 and set(dtypes) == {torch.bfloat16}  # 2 steps x (plain + prompted)
    logged = trainer.state.log_history[0]
    for part in ("loss_ce", "loss_kd", "loss_hcl", "loss_reg"):
        assert torch.isfinite(torch.tensor(logged[part])), part
