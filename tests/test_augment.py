"""timm's training augmentation, drawn once per image for both models (pat_hf.data.augment)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pat_hf import with_image_transforms
from pat_hf.data.augment import (
    AugmentationConfig,
    build_image_transforms,
    build_train_augmentation,
    sample_seed,
)
from pat_hf.data.datasets import PerSampleSeededDataset, collate_images
from pat_hf.data.device import device_views
from pat_hf.data.views import ImageView, convert_view
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


def views_of(out: dict, student: ImageView, teacher: ImageView | None):
    """What the trainer does with a sample on the device."""
    erase = out["erase"][None] if "erase" in out else None
    s, t = device_views(out["pixel_values"][None], student, teacher, erase)
    return s[0], (t[0] if t is not None else None)


def test_one_uint8_image_per_sample_at_the_larger_size():
    transform = build_image_transforms(STUDENT, TEACHER_2X, train=True, **RECIPE)
    out = transform(image())
    assert set(out) == {"pixel_values", "erase"}
    assert out["pixel_values"].dtype == torch.uint8 and out["pixel_values"].shape == (3, 32, 32)
    assert out["erase"].dtype == torch.int64 and out["erase"].shape == (1, 6)
    assert set(build_image_transforms(STUDENT, None, train=True)(image())) == {"pixel_values"}  # no erasing


def test_equal_views_give_identical_tensors():
    transform = build_image_transforms(STUDENT, STUDENT, train=True, **RECIPE)
    for seed in range(6):
        student, teacher = views_of(transform(image(seed), seed=seed), STUDENT, STUDENT)
        assert torch.equal(student, teacher)


def test_a_teacher_at_twice_the_size_sees_the_student_image():
    """Downsampling the teacher's view (its normalisation undone, the student's applied) gives the student's view:
    every random op (crop, flip, RandAugment, erasing box and fill) was drawn once."""
    transform = build_image_transforms(STUDENT, TEACHER_2X, train=True, **{**RECIPE, "re_prob": 1.0})
    for seed in range(6):
        student, teacher = views_of(transform(image(seed), seed=seed), STUDENT, TEACHER_2X)
        assert student.shape == (3, 16, 16) and teacher.shape == (3, 32, 32)
        down = convert_view(teacher[None], TEACHER_2X, STUDENT)[0]
        torch.testing.assert_close(down, student, atol=1e-5, rtol=0)


@pytest.mark.parametrize("erasing", [{}, {"re_prob": 1.0, "re_mode": "const"}])
def test_device_views_equal_the_former_cpu_path(erasing):
    """The former pipeline, rebuilt from timm: its full transform (float tensor, the student's normalisation,
    random erasing) at the base size on the CPU, then each view resized and renormalised per image. The new one
    makes a uint8 image on the CPU and the views on the device: with the same draws, the same pixels within one
    uint8 step (the order of the float ops differs)."""
    from timm.data import create_transform

    options = {**RECIPE, "re_prob": 0.0, **erasing}
    transform = build_image_transforms(STUDENT, TEACHER_2X, train=True, **options)
    _, _, final = create_transform(
        input_size=(3, 32, 32), is_training=True, hflip=0.5, color_jitter=0.4, auto_augment=options["auto_augment"],
        interpolation="random", mean=STUDENT.mean, std=STUDENT.std, re_prob=options["re_prob"],
        re_mode=options["re_mode"], separate=True, scale=(0.08, 1.0),
    )  # fmt: skip
    primary, secondary = transform.timm_transforms
    base = ImageView(size=(32, 32), mean=STUDENT.mean, std=STUDENT.std)
    for seed in range(6):
        seeded(seed)
        old = final(secondary(primary(image(seed))))[None]
        old_student, old_teacher = convert_view(old, base, STUDENT)[0], convert_view(old, base, TEACHER_2X)[0]
        seeded(seed)
        student, teacher = views_of(transform(image(seed)), STUDENT, TEACHER_2X)
        for new, ref, view in ((student, old_student, STUDENT), (teacher, old_teacher, TEACHER_2X)):
            # In uint8 steps: (normalised difference) * std * 255.
            steps = ((new - ref).abs() * torch.tensor(view.std).view(3, 1, 1) * 255).max().item()
            assert steps <= 1.0, (seed, steps)


def test_per_sample_seeds_fix_every_draw_and_leave_the_global_generators_alone():
    transform = build_image_transforms(STUDENT, TEACHER_2X, train=True, **{**RECIPE, "re_prob": 0.5})
    seeded(0)
    state = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a = transform(image(), seed=sample_seed(7, 0, 3))
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])
    random.random(), np.random.rand(), torch.rand(3)  # moving the global streams changes nothing
    b = transform(image(), seed=sample_seed(7, 0, 3))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["erase"], b["erase"])
    others = [transform(image(), seed=sample_seed(7, e, i))["pixel_values"] for e, i in ((1, 3), (0, 4), (8, 3))]
    assert not any(torch.equal(a["pixel_values"], o) for o in others)  # epoch, index, run seed all count


def test_erasing_fill_comes_from_the_drawn_seed():
    transform = build_image_transforms(STUDENT, None, train=True, re_prob=1.0, re_mode="pixel", re_count=3)
    outs = [transform(image(i), seed=i) for i in range(4)]
    batch = torch.stack([o["pixel_values"] for o in outs])
    erase = torch.stack([o["erase"] for o in outs])
    first, _ = device_views(batch, STUDENT, None, erase)
    second, _ = device_views(batch, STUDENT, None, erase)
    assert torch.equal(first, second)
    assert (erase[..., 2] > 0).sum() >= 4  # boxes were drawn (1 to 3 per image)
    plain, _ = device_views(batch, STUDENT, None, None)
    assert not torch.equal(first, plain)


def test_seeded_dataset_gives_the_same_pixels_for_any_worker_count():
    dataset = with_image_transforms(make_image_dataset(n=6), STUDENT, TEACHER_2X, train=True, **RECIPE)
    seeded_data = PerSampleSeededDataset(dataset, run_seed=5)

    def load(workers: int) -> dict:
        loader = torch.utils.data.DataLoader(seeded_data, batch_size=3, num_workers=workers, collate_fn=collate_images)
        batches = list(loader)
        return {k: torch.cat([torch.as_tensor(b[k]) for b in batches]) for k in batches[0]}

    seeded_data.set_epoch(2)
    one, two = load(0), load(2)
    assert one["pixel_values"].dtype == torch.uint8 and one["pixel_values"].shape == (6, 3, 32, 32)
    for key in one:
        assert torch.equal(one[key], two[key]), key
    single = seeded_data[4]  # alone or in a batch: the same sample
    assert torch.equal(single["pixel_values"], one["pixel_values"][4])
    seeded_data.set_epoch(3)
    assert not torch.equal(load(0)["pixel_values"], one["pixel_values"])  # a new epoch draws anew


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
    primary, secondary = transform.timm_transforms
    crop, flip = primary.transforms
    assert crop.size == (32, 32) and crop.scale == (0.3, 1.0) and crop.ratio == (0.5, 2.0)  # at the base size
    assert flip.p == 0.25
    (rand_augment,) = secondary.transforms
    assert type(rand_augment).__name__ == "RandAugment" and rand_augment.num_layers == 3
    assert rand_augment.ops[0].magnitude == 7
    config = transform.config
    assert (config.re_prob, config.re_mode, config.re_count) == (0.4, "rand", 2)
    assert transform.base_size == (32, 32)
    # timm drops colour jitter under RandAugment, as in its own pipeline; without RandAugment it is there.
    jitter = build_train_augmentation(STUDENT, color_jitter=0.4).timm_transforms[1].transforms
    assert [type(t).__name__ for t in jitter] == ["ColorJitter"]
    assert not build_train_augmentation(STUDENT, color_jitter=0).timm_transforms[1].transforms


def test_one_config_object_passed_down_whole():
    config = AugmentationConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, hflip=True, crop_ratio=[0.5, 2])
    assert config.hflip == 0.5 and config.crop_ratio == (0.5, 2.0)
    assert AugmentationConfig.from_dict(config.to_dict()) == config
    train = with_image_transforms(make_image_dataset(n=3), STUDENT, None, train=True, augmentation=config)
    from pat_hf.data.datasets import prepared_info

    assert prepared_info(train)["augmentation"] is config
    assert prepared_info(with_image_transforms(make_image_dataset(n=3), STUDENT, train=True, re_prob=0.5))[
        "augmentation"
    ] == AugmentationConfig(re_prob=0.5)  # the former keywords build the same object
    with pytest.raises(TypeError, match="not both"):
        with_image_transforms(make_image_dataset(n=3), STUDENT, train=True, augmentation=config, re_prob=0.5)
    with pytest.raises(ValueError, match="Unknown augmentation"):
        AugmentationConfig.from_dict({"re_probability": 0.5})


def test_modules_depend_one_way():
    """views <- augment <- datasets: views imports no other pat_hf module (tests/test_layout.py checks the rest)."""
    import ast
    import inspect

    import pat_hf.data.augment
    import pat_hf.data.views

    def imported(module) -> set[str]:
        tree = ast.parse(inspect.getsource(module))
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}

    assert imported(pat_hf.data.views) == set()
    assert imported(pat_hf.data.augment) == {"views"}


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
        a = plain(image(seed), seed=seed)["pixel_values"]
        b = augmented(image(seed), seed=seed)["pixel_values"]
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
        student, teacher = views_of(transform(image(seed), seed=seed), STUDENT, TEACHER_2X)
        erased = torch.isclose(teacher, fill_t.view(3, 1, 1), atol=1e-5).all(0)
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        if len(rows) < 4 or len(cols) < 4:
            continue  # no box fitting in 10 tries, or a tiny one
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
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8
    # The erasing boxes stay a NumPy array: Trainer moves only tensors, the boxes are read on the host.
    assert isinstance(batch["erase"], np.ndarray) and batch["erase"].shape == (4, 1, 6)
    assert batch["erase"].dtype == np.int64 and "teacher_pixel_values" not in batch
    from_tensor, _ = device_views(batch["pixel_values"], STUDENT, TEACHER_2X, torch.from_numpy(batch["erase"]))
    torch.testing.assert_close(device_views(batch["pixel_values"], STUDENT, TEACHER_2X, batch["erase"])[0], from_tensor)


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
    assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
    assert out[0].max() < 13 and out[2].min() > 242


def test_increasing_posterize_works_with_the_installed_pillow():
    """timm's 'inc1' RandAugment posterizes to 0 bits at full magnitude: the installed Pillow must accept it (the
    requirement pins pillow<13), else the option check says so before training."""
    from PIL import Image, ImageOps

    from pat_hf.data.augment import _pillow_posterizes_to_zero_bits, check_augmentation_options

    assert _pillow_posterizes_to_zero_bits()
    assert ImageOps.posterize(Image.new("RGB", (2, 2), (200, 100, 50)), 0).getpixel((0, 0)) == (0, 0, 0)
    check_augmentation_options(auto_augment="rand-m9-mstd0.5-inc1")
