"""timm's training augmentation, drawn once per image for both models (pat_hf.augment)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pat_hf import with_image_transforms
from pat_hf.augment import build_train_augmentation
from pat_hf.data import collate_images
from pat_hf.preprocessing import ImageView, build_image_transforms, convert_view
from support.tiny import make_image_dataset

STUDENT = ImageView(size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
TEACHER_2X = ImageView(size=(32, 32), mean=(0.2, 0.3, 0.4), std=(0.1, 0.2, 0.3))
RECIPE = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "train_interpolation": "random",
    "color_jitter": 0.4,
}


def image(seed: int = 0, size: int = 40) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def seeded(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_equal_views_give_identical_tensors():
    transform = build_image_transforms(STUDENT, STUDENT, train=True, **RECIPE)
    for seed in range(6):
        seeded(seed)
        out = transform(image(seed))
        assert torch.equal(out["pixel_values"], out["teacher_pixel_values"])


def test_a_teacher_at_twice_the_size_sees_the_student_image():
    """Downsampling the teacher's view (its normalisation undone, the student's applied) gives the student's view:
    every random op (crop, flip, RandAugment, erasing box and fill) was drawn once."""
    transform = build_image_transforms(STUDENT, TEACHER_2X, train=True, **{**RECIPE, "re_prob": 1.0})
    for seed in range(6):
        seeded(seed)
        out = transform(image(seed))
        assert out["pixel_values"].shape == (3, 16, 16) and out["teacher_pixel_values"].shape == (3, 32, 32)
        down = convert_view(out["teacher_pixel_values"][None], TEACHER_2X, STUDENT)[0]
        torch.testing.assert_close(down, out["pixel_values"], atol=1e-5, rtol=0)


def test_same_seed_same_views_and_the_draws_differ_between_seeds():
    transform = build_image_transforms(STUDENT, TEACHER_2X, train=True, **RECIPE)
    seeded(3)
    a = transform(image())
    seeded(3)
    b = transform(image())
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert torch.equal(a["teacher_pixel_values"], b["teacher_pixel_values"])
    seeded(4)
    assert not torch.equal(transform(image())["pixel_values"], a["pixel_values"])


def test_options_reach_timm():
    transform = build_train_augmentation(
        STUDENT,
        TEACHER_2X,
        min_crop_scale=0.3,
        crop_ratio=(0.5, 2.0),
        hflip=0.25,
        train_interpolation="bicubic",
        auto_augment="rand-m7-n3-mstd0.5-inc1",
        re_prob=0.4,
        re_mode="rand",
        re_count=2,
    )
    primary, secondary, final = transform.timm_transforms
    crop, flip = primary.transforms
    assert crop.size == (32, 32) and crop.scale == (0.3, 1.0) and crop.ratio == (0.5, 2.0)  # at the base size
    assert flip.p == 0.25
    (rand_augment,) = secondary.transforms
    assert type(rand_augment).__name__ == "RandAugment" and rand_augment.num_layers == 3
    assert rand_augment.ops[0].magnitude == 7
    erasing = final.transforms[-1]
    assert type(erasing).__name__ == "RandomErasing"
    assert (erasing.probability, erasing.mode, erasing.max_count) == (0.4, "rand", 2)
    # timm drops colour jitter under RandAugment, as in its own pipeline; without RandAugment it is there.
    jitter = build_train_augmentation(STUDENT, color_jitter=0.4).timm_transforms[1].transforms
    assert [type(t).__name__ for t in jitter] == ["ColorJitter"]
    assert not build_train_augmentation(STUDENT, color_jitter=0).timm_transforms[1].transforms


def test_randaugment_changes_the_image():
    """Same crop and flip draws with and without RandAugment: only RandAugment can make the difference."""
    plain = build_image_transforms(STUDENT, None, train=True, min_crop_scale=1.0, crop_ratio=(1.0, 1.0), hflip=0)
    augmented = build_image_transforms(
        STUDENT,
        None,
        train=True,
        min_crop_scale=1.0,
        crop_ratio=(1.0, 1.0),
        hflip=0,
        auto_augment="rand-m9-n2-mstd0-inc1",
    )
    changed = 0
    for seed in range(4):
        seeded(seed)
        a = plain(image(seed))["pixel_values"]
        seeded(seed)
        b = augmented(image(seed))["pixel_values"]
        changed += not torch.equal(a, b)
    assert changed >= 3


def test_random_erasing_erases_the_same_relative_box_in_both_views():
    """re_prob=1, constant fill: the teacher's view (32 px) has one exactly constant box, filled with the student's
    mean colour in the teacher's normalisation; the student's view (16 px) holds the same colour over that box,
    halved."""
    transform = build_image_transforms(
        STUDENT, TEACHER_2X, train=True, re_prob=1.0, re_mode="const", min_crop_scale=1.0, crop_ratio=(1, 1)
    )
    fill_t = (torch.tensor(STUDENT.mean) - torch.tensor(TEACHER_2X.mean)) / torch.tensor(TEACHER_2X.std)
    found = 0
    for seed in range(8):
        seeded(seed)
        out = transform(image(seed))
        teacher, student = out["teacher_pixel_values"], out["pixel_values"]
        erased = torch.isclose(teacher, fill_t.view(3, 1, 1), atol=1e-6).all(0)
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        if len(rows) < 4 or len(cols) < 4:
            continue  # timm found no box fitting in 10 tries, or a tiny one
        found += 1
        y0, y1, x0, x1 = rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1
        assert erased[y0:y1, x0:x1].all()  # one rectangle
        # Student: the fill (0 in its own normalisation) over the interior of the halved box.
        inner = student[:, (y0 + 1) // 2 + 1 : y1 // 2 - 1, (x0 + 1) // 2 + 1 : x1 // 2 - 1]
        if inner.numel():
            torch.testing.assert_close(inner, torch.zeros_like(inner), atol=1e-5, rtol=0)
    assert found >= 4


def test_dataset_transforms_take_the_recipe_options():
    dataset = make_image_dataset(n=4)
    train = with_image_transforms(dataset, STUDENT, TEACHER_2X, train=True, **RECIPE)
    batch = collate_images([train[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["teacher_pixel_values"].shape == (4, 3, 32, 32)


def test_hflip_bool_and_bad_options():
    assert build_train_augmentation(STUDENT, hflip=True).timm_transforms[0].transforms[1].p == 0.5
    assert len(build_train_augmentation(STUDENT, hflip=False).timm_transforms[0].transforms) == 1
    for bad, match in (
        ({"re_prob": 2.0}, "re_prob"),
        ({"re_mode": "noise"}, "re_mode"),
        ({"auto_augment": "randaug9"}, "auto_augment"),
        ({"train_interpolation": "lanczos5"}, "train_interpolation"),
        ({"min_crop_scale": 0.0}, "min_crop_scale"),
        ({"crop_ratio": (2.0, 1.0)}, "crop_ratio"),
    ):
        with pytest.raises(ValueError, match=match):
            build_train_augmentation(STUDENT, **bad)


def test_evaluation_is_timms_aspect_keeping_resize_and_centre_crop():
    """A 64x32 image whose left eighth is red: timm's evaluation transform resizes the shorter side and crops the
    centre, so no red is left (squashing the whole width into the view would keep it)."""
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :8, 0] = 255
    arr[:, 8:, 2] = 255
    view = ImageView(size=(8, 8), mean=(0.0,) * 3, std=(1.0,) * 3, crop_pct=1.0)
    out = build_image_transforms(view, None, train=False)(Image.fromarray(arr))["pixel_values"]
    assert out.shape == (3, 8, 8) and out[0].max() < 0.05 and out[2].min() > 0.95


def test_increasing_posterize_works_with_the_installed_pillow():
    """timm's 'inc1' RandAugment posterizes to 0 bits at full magnitude: the installed Pillow must accept it (the
    requirement pins pillow<13), else the option check says so before training."""
    from PIL import Image, ImageOps

    from pat_hf.augment import _pillow_posterizes_to_zero_bits, check_augmentation_options

    assert _pillow_posterizes_to_zero_bits()
    assert ImageOps.posterize(Image.new("RGB", (2, 2), (200, 100, 50)), 0).getpixel((0, 0)) == (0, 0, 0)
    check_augmentation_options(auto_augment="rand-m9-mstd0.5-inc1")
