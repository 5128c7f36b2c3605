"""Image views: both models get the same augmented image, each with its own size and normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ConvNextImageProcessor, ViTImageProcessor

from pat_hf import ImageView, create_student, with_image_transforms
from pat_hf.data.augment import build_image_transforms
from pat_hf.data.datasets import collate_images
from pat_hf.data.device import device_views
from pat_hf.data.views import build_eval_transform, convert_view, make_view
from support.tiny import make_image_dataset


def test_view_from_timm_uses_the_actual_input_size():
    vit = create_student("test_vit", num_classes=3, img_size=32)
    view = ImageView.from_timm(vit)
    assert view.size == (32, 32)
    assert view.mean == (0.5, 0.5, 0.5)
    cnn = create_student("test_resnet", num_classes=3, img_size=40, pretrained_cfg_overlay={"crop_pct": 1.0})
    assert ImageView.from_timm(cnn).size == (40, 40) and ImageView.from_timm(cnn).crop_pct == 1.0


def test_view_from_image_processors():
    vit = ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    view = ImageView.from_image_processor(vit)
    assert view.size == (48, 48) and view.mean == (0.1, 0.2, 0.3) and view.std == (0.4, 0.5, 0.6)
    convnext = ConvNextImageProcessor(size={"shortest_edge": 64})
    assert ImageView.from_image_processor(convnext).size == (64, 64)


def test_convert_view_round_trip_and_identity():
    a = ImageView(size=(8, 8), mean=(0.5,) * 3, std=(0.25,) * 3)
    b = ImageView(size=(8, 8), mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    raw = torch.rand(2, 3, 8, 8)
    x_a = (raw - 0.5) / 0.25
    x_b = convert_view(x_a, a, b)
    expected = (raw - torch.tensor(b.mean).view(1, 3, 1, 1)) / torch.tensor(b.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x_b, expected)
    torch.testing.assert_close(convert_view(x_b, b, a), x_a)
    assert convert_view(x_a, a, a) is x_a
    c = ImageView(size=(4, 4), mean=a.mean, std=a.std)
    assert convert_view(x_a, a, c).shape == (2, 3, 4, 4)


def test_both_views_come_from_the_same_augmented_image():
    student = ImageView(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    teacher = ImageView(size=(16, 16), mean=(0.2,) * 3, std=(0.1,) * 3)
    transform = build_image_transforms(student, teacher, train=True, min_crop_scale=0.1)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    for seed in range(5):
        pixels = transform(image, seed=seed)["pixel_values"][None]
        s, t = device_views(pixels, student, teacher)
        # Undo each normalisation: the same pixels (same crop, same flip).
        torch.testing.assert_close(s * 0.5 + 0.5, t * 0.1 + 0.2, atol=1e-5, rtol=0)


def test_make_view_is_totensor_normalize_and_resize():
    view = ImageView(size=(6, 6), mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    pixels = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    ref = (pixels.float() / 255 - torch.tensor(view.mean).view(1, 3, 1, 1)) / torch.tensor(view.std).view(1, 3, 1, 1)
    same_size = ImageView(size=(12, 12), mean=view.mean, std=view.std)
    torch.testing.assert_close(make_view(pixels, same_size), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(make_view(pixels, view), convert_view(ref, same_size, view), atol=1e-5, rtol=0)


def test_views_have_their_own_sizes():
    student = ImageView(size=(12, 12))
    teacher = ImageView(size=(20, 20))
    transform = build_image_transforms(student, teacher, train=True)
    out = transform(Image.new("RGB", (30, 30)))
    assert out["pixel_values"].shape == (3, 20, 20)  # one image, at the larger size
    s, t = device_views(out["pixel_values"][None], student, teacher)
    assert s.shape == (1, 3, 12, 12) and t.shape == (1, 3, 20, 20)
    evaluation = build_image_transforms(student, teacher, train=False)(Image.new("RGB", (30, 30)))
    # Evaluation: each model's own resize and centre crop (the teacher's only for eval_loss_kd, when given).
    assert evaluation["pixel_values"].shape == (3, 12, 12) and evaluation["teacher_pixel_values"].shape == (3, 20, 20)
    assert set(build_image_transforms(student, None, train=False)(Image.new("RGB", (30, 30)))) == {"pixel_values"}


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grey_rgba_and_palette_images_become_rgb(mode):
    image = Image.new(mode, (10, 10))
    out = build_image_transforms(ImageView(size=(8, 8)), None, train=False)(image)
    assert out["pixel_values"].shape == (3, 8, 8)


def test_dataset_transforms_and_collation():
    dataset = make_image_dataset(n=6)
    train = with_image_transforms(dataset, ImageView(size=(8, 8)), ImageView(size=(12, 12)), train=True)
    batch = collate_images([train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 12, 12) and batch["pixel_values"].dtype == torch.uint8
    assert batch["labels"].tolist() == [0, 1, 2, 0]
    assert dataset.column_names == ["image", "label"]  # the original is untouched


def test_teacher_view_derived_by_resizing_is_flagged_once(tmp_path, caplog):
    """Without teacher_pixel_values the teacher's view is resized from the student's: the geometry can change
    (padding is not undone), so the wrapper says so, once."""
    import logging

    from pat_hf import PATTrainingArguments, build_distillation_model
    from support.tiny import tiny_teacher

    student = create_student("test_resnet", num_classes=3, img_size=20)
    args = PATTrainingArguments(str(tmp_path), distill_method="kd", use_cpu=True, report_to=[])
    model = build_distillation_model(args, student, tiny_teacher("vit"), class_names=["cat", "dog", "bird"])
    x, y = torch.randn(2, 3, 20, 20), torch.tensor([0, 1])
    with caplog.at_level(logging.WARNING, logger="pat_hf.training.modeling"):
        model.train()(x, labels=y)
        model(x, labels=y)
    messages = [r.getMessage() for r in caplog.records if "teacher_pixel_values" in r.getMessage()]
    assert len(messages) == 1 and "16x16" in messages[0] and "20x20" in messages[0] and "padding" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pat_hf.training.modeling"):
        model(x, labels=y, teacher_pixel_values=torch.randn(2, 3, 16, 16))
    assert not caplog.records


def test_evaluation_batches_carry_the_teachers_own_view(tmp_path, caplog):
    """With a teacher view, evaluation gives the teacher its own resize and centre crop of the image (no
    conversion from the student's crop, no warning), and eval_loss_kd is computed on it."""
    import logging

    from timm.data import create_transform

    from pat_hf import PATDistillationTrainer
    from support.tiny import tiny_args, tiny_teacher

    dataset = make_image_dataset(n=6, size=24)
    student = create_student("test_resnet", num_classes=3, img_size=20)
    student_view = ImageView.from_timm(student)
    teacher_view = ImageView(size=(16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=0.875)
    evaluation = with_image_transforms(dataset, student_view, teacher_view, train=False)
    item = evaluation[0]
    assert tuple(item["pixel_values"].shape) == (3, 20, 20) and tuple(item["teacher_pixel_values"].shape) == (3, 16, 16)
    expected = create_transform(
        input_size=(3, 16, 16), is_training=False, interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3,
        crop_pct=0.875,
    )(dataset[0]["image"].convert("RGB"))  # fmt: skip
    assert item["teacher_pixel_values"].dtype == torch.uint8  # normalised on the device
    torch.testing.assert_close(
        make_view(item["teacher_pixel_values"][None], teacher_view)[0], expected, atol=1e-5, rtol=0
    )

    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher("vit"),
        args=tiny_args(tmp_path, distill_method="kd"),
        train_dataset=with_image_transforms(dataset, student_view, teacher_view, train=True),
        eval_dataset=evaluation,
    )
    with caplog.at_level(logging.WARNING, logger="pat_hf.training.modeling"):
        metrics = trainer.evaluate()
    assert "eval_loss_kd" in metrics
    assert not [r for r in caplog.records if "teacher_pixel_values" in r.getMessage()]


@pytest.mark.parametrize("image_size", [(40, 40), (24, 24), (13, 13)])
def test_evaluation_views_agree_with_the_image_processors(image_size):
    """A model's evaluation view (uint8 crop on the CPU, normalisation on the device) against its own image
    processor's preprocessing (transformers' ViT processor: a plain resize, bilinear): within one uint8 step."""
    processor = ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]
    )
    view = ImageView.from_image_processor(processor)
    transform = build_eval_transform(view)
    rng = np.random.default_rng(0)
    for _ in range(3):
        image = Image.fromarray(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8))
        ours = make_view(transform(image)[None], view)[0]
        theirs = torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"][0]))
        steps = ((ours - theirs).abs() * torch.tensor(view.std).view(3, 1, 1) * 255).max().item()
        assert steps <= 1.01, steps


def test_uint8_batches_become_each_models_view_in_the_wrapper(tmp_path):
    """The trainer's device step: a uint8 batch at the larger size gives the student and the teacher their views,
    which agree with each other (one image, two resizes) and with make_view."""
    from pat_hf import PATTrainingArguments, build_distillation_model
    from support.tiny import tiny_teacher

    student = create_student("test_resnet", num_classes=3, img_size=20)
    args = PATTrainingArguments(str(tmp_path), distill_method="kd", use_cpu=True, report_to=[])
    model = build_distillation_model(args, student, tiny_teacher("vit"), class_names=["cat", "dog", "bird"])
    pixels = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    views = model.train().make_views({"pixel_values": pixels, "labels": torch.tensor([0, 1])})
    assert views["pixel_values"].dtype == torch.float32 and views["pixel_values"].shape == (2, 3, 20, 20)
    teacher_view = model.teacher.view
    assert views["teacher_pixel_values"].shape == (2, 3, *teacher_view.size)
    torch.testing.assert_close(views["teacher_pixel_values"], make_view(pixels, teacher_view))
    torch.testing.assert_close(views["pixel_values"], make_view(pixels, model.student_view))
    # In evaluation the teacher's view is made only for eval_teacher_losses.
    assert model.eval().make_views({"pixel_values": pixels})["teacher_pixel_values"].shape[-1] == teacher_view.size[1]
    model.method.eval_teacher_losses = False
    assert model.make_views({"pixel_values": pixels}).get("teacher_pixel_values") is None
    out = model.train()(pixels, labels=torch.tensor([0, 1]))  # the forward accepts uint8 too
    assert torch.isfinite(out["loss"])
