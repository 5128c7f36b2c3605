"""The second round of bad input and faults (issue 23): runs that cannot train, ambiguous class names, every PIL
mode, the dataset shapes `datasets` users pass, checkpoints without their file list, settings refused before long
work. Network faults of a Hub push: test_reliability_network.py."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
import transformers as tf
from PIL import Image

from pat_hf import ImageView, PATDistillationTrainer, PATTrainingArguments, create_student, with_image_transforms
from pat_hf.checkpoint_integrity import FILE_LIST_NAME, verify_checkpoint
from pat_hf.data.images import to_rgb
from pat_hf.data.views import make_view
from pat_hf.errors import (
    CheckpointError,
    DatasetError,
    ImageLoadError,
    LabelError,
    OutputDirError,
    StudentLoadError,
    TeacherLoadError,
)
from pat_hf.models.teacher import match_classes
from pat_hf.training.output_dir import check_output_dir
from pat_hf.training.progress_check import StudentUnchangedError
from pat_hf.training.validation import resolve_labels
from support.tiny import make_image_dataset, tiny_args, tiny_teacher

VIEW = ImageView(size=(16, 16))
# mean 0 / std 1: pixel_values are the RGB values / 255, so the tests read the decoded colours back.
RAW = ImageView(size=(4, 4), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=1.0, interpolation="nearest")


def student():
    torch.manual_seed(0)
    return create_student("test_resnet", num_classes=3, img_size=16)


def train_data(n=8):
    return with_image_transforms(make_image_dataset(n=n, size=16), VIEW, VIEW, train=True)


def trainer(tmp_path, model=None, teacher=None, data=None, **overrides):
    overrides.setdefault("max_steps", 2)
    overrides.setdefault("per_device_train_batch_size", 4)
    return PATDistillationTrainer(
        model=model if model is not None else student(),
        teacher=teacher if teacher is not None else tiny_teacher("vit"),
        args=tiny_args(tmp_path, **overrides),
        train_dataset=data if data is not None else train_data(),
    )


def args(tmp_path, **overrides):
    return tiny_args(tmp_path, **overrides)


# ---- 1. runs that cannot train ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"learning_rate": 0.0}, r"learning_rate=0 with no schedule that raises it.*untrained student"),
        ({"learning_rate": -1e-3}, r"learning_rate must be > 0"),
        ({"learning_rate": float("nan")}, r"learning_rate must be > 0 and finite"),
        ({"num_train_epochs": 0}, r"num_train_epochs=0 with max_steps=-1: .*no step"),
        ({"num_train_epochs": 0, "max_steps": 0}, r"num_train_epochs=0 with max_steps=0"),
        ({"num_train_epochs": -1}, r"num_train_epochs must be >= 0"),
        ({"ce_weight": 0.0, "kd_weight": 0.0}, r"Every loss weight of distill_method='kd' is 0 \(ce_weight=0.0, kd_w"),
        ({"distill_method": "none", "ce_weight": 0.0}, r"Every loss weight of distill_method='none' is 0"),
        (
            {"distill_method": "ofa", "ce_weight": 0.0, "kd_weight": 0.0, "ofa_weight": 0.0},
            r"distill_method='ofa' is 0 \(ce_weight=0.0, kd_weight=0.0, ofa_weight=0.0\)",
        ),
        (
            {"distill_method": "fitnet", "ce_weight": 0, "kd_weight": 0, "fitnet_weight": 0},
            r"fitnet_weight=0",
        ),
    ],
)
def test_settings_that_cannot_train_are_refused_by_the_arguments(tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        args(tmp_path, **overrides)


def test_settings_that_train_are_accepted(tmp_path):
    # max_steps decides the length; a timm warm-up raises a base rate of 0; one weight left is enough.
    assert args(tmp_path, num_train_epochs=0, max_steps=3).max_steps == 3
    warm = args(tmp_path, learning_rate=0.0, lr_schedule="cosine", warmup_epochs=1, warmup_lr=1e-3)
    assert warm.learning_rate == 0.0
    assert args(tmp_path, ce_weight=0.0).kd_weight == 1.0
    assert args(tmp_path, distill_method="ofa", ce_weight=0.0, kd_weight=0.0).ofa_weight == 1.0


def test_a_loss_that_does_not_reach_the_student_stops_at_the_first_steps(tmp_path):
    # DIST with both relation weights 0 and no cross-entropy: every step's loss is 0, which the arguments cannot see.
    model = student()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    run = trainer(
        tmp_path, model=model, distill_method="dist", ce_weight=0.0, dist_beta=0.0, dist_gamma=0.0, max_steps=6
    )
    with pytest.raises(StudentUnchangedError, match=r"first 3 optimizer steps .*does not depend on the student"):
        run.train()
    assert run.state.global_step == 2  # stopped at the third step, before its update
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_a_student_that_did_not_change_is_not_called_distilled(tmp_path, caplog):
    # The gradients are there, but the optimizer given to Trainer does not move the student (lr 0).
    model = student()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    run = PATDistillationTrainer(
        model=model,
        teacher=tiny_teacher("vit"),
        args=tiny_args(tmp_path, max_steps=2, per_device_train_batch_size=4, lr_scheduler_type="constant"),
        train_dataset=train_data(),
        optimizers=(optimizer, None),
    )
    with caplog.at_level(logging.WARNING):
        run.train()
    assert "TRAINING DID NOT CHANGE THE STUDENT: 2 steps ran" in caplog.text
    run.save_model()
    run.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Not trained**: no training step changed" in card and "student distilled from" not in card


def test_resuming_a_finished_run_is_not_mistaken_for_an_untrained_one(tmp_path, caplog):
    run = trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    run.train()
    # The same trainer and a fresh one resume at the last step: no step to run, weights from training.
    with caplog.at_level(logging.WARNING):
        run.train(resume_from_checkpoint=True)
        again = trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
        again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 2
    assert "DID NOT CHANGE" not in caplog.text
    again.create_model_card()
    assert "Not trained" not in (tmp_path / "out" / "README.md").read_text()


def test_a_frozen_student_is_refused_at_train_start(tmp_path):
    model = student().requires_grad_(False)
    with pytest.raises(StudentUnchangedError, match=r"no trainable parameter"):
        trainer(tmp_path, model=model).train()


def test_a_run_that_trains_passes_the_checks_and_its_card_says_distilled(tmp_path):
    run = trainer(tmp_path)
    run.train()
    assert run.state.global_step == 2
    run.save_model()
    run.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "student distilled from the teacher" in card and "Not trained" not in card


def test_a_model_card_written_before_training_does_not_claim_distillation(tmp_path, caplog):
    run = trainer(tmp_path)
    run.save_model()
    with caplog.at_level(logging.WARNING):
        run.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "**Not trained**" in card and "student distilled from" not in card
    assert "says that the student is not trained" in caplog.text


SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "run_image_classification_pat.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("run_image_classification_pat_round2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def script_args(out, *extra):
    return [
        "--teacher_name_or_path", str(out) + "-no-teacher",
        "--student_name", "test_resnet",
        "--dataset_name", str(out) + "-no-data",
        "--output_dir", str(out),
        "--report_to", "none",
        "--use_cpu", "true",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "flags, pattern",
    [
        ([], r"Nothing to do: neither --do_train nor --do_eval is set\. Pass --do_train"),
        (["--do_predict"], r"Nothing to do: .*--do_predict is not supported"),
        (["--do_train", "--do_predict"], r"--do_predict is not supported by this script"),
        (
            ["--do_train", "--student_kwargs", '{"num_classes": 10}'],
            r"--student_kwargs sets 'num_classes', which the script already sets from the dataset's labels",
        ),
        (["--do_train", "--student_kwargs", '{"pretrained": true}'], r"sets 'pretrained'.*--student_pretrained"),
        (["--do_eval", "--push_to_hub"], r"--push_to_hub without --do_train would push a student this run did not"),
    ],
)
def test_the_script_refuses_to_do_nothing_and_arguments_set_twice(script, tmp_path, flags, pattern):
    with pytest.raises(ValueError, match=pattern):
        script.main(script_args(tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


# ---- 2. labels and classes ------------------------------------------------------------------------------------------

IMAGENETISH = ["tench", "crane", "goldfish", "crane", "Cat", "cat"]


@pytest.mark.parametrize(
    "dataset_names, pattern",
    [
        (["crane", "tench"], r"holds the same class name more than once .*'crane' \(classes 1, 3\)"),
        (["CAT", "goldfish"], r"'Cat' and 'cat' \(classes 4, 5\)"),
        (["Goldfish", "goldfish"], r"dataset names classes alike .*'Goldfish' and 'goldfish' \(classes 0, 1\)"),
        (["tench", "tench"], r"dataset names classes alike .*'tench' \(classes 0, 1\)"),
    ],
)
def test_names_the_matching_cannot_tell_apart_are_refused(dataset_names, pattern):
    with pytest.raises(LabelError, match=pattern):
        match_classes(IMAGENETISH, len(IMAGENETISH), dataset_names, len(dataset_names))


def test_exact_names_are_matched_despite_look_alikes():
    assert match_classes(IMAGENETISH, 6, ["cat", "Cat", "tench"], 3).tolist() == [5, 4, 0]
    assert match_classes(IMAGENETISH, 6, ["goldfish", "tench"], 2).tolist() == [2, 0]


def test_a_teacher_with_a_duplicated_class_name_is_refused_at_trainer_init(tmp_path):
    teacher = tiny_teacher("vit", num_labels=4, id2label={0: "cat", 1: "crane", 2: "dog", 3: "crane"})
    names = ["crane", "cat", "dog"]
    base = make_image_dataset(n=6, size=16, names=names)
    with pytest.raises(LabelError, match=r"'crane' \(classes 1, 3\)"):
        trainer(tmp_path, teacher=teacher, data=with_image_transforms(base, VIEW, VIEW, train=True))


def test_names_equal_up_to_unicode_form_are_one_name():
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert match_classes(["tea", composed], 2, [decomposed, "tea"], 2).tolist() == [1, 0]
    with pytest.raises(LabelError, match=r"dataset names classes alike"):
        match_classes(["tea", composed], 2, [decomposed, composed], 2)


def test_integer_labels_read_as_the_teachers_classes_are_named_in_a_warning(caplog):
    teacher = tiny_teacher(
        "vit", num_labels=5, id2label={0: "tench", 1: "goldfish", 2: "shark", 3: "hen", 4: "ostrich"}
    )
    from pat_hf import load_teacher

    data = datasets.Dataset.from_dict({"image": list(make_image_dataset(n=4, size=8)["image"]), "label": [0, 1, 2, 1]})
    with caplog.at_level(logging.WARNING):
        space = resolve_labels(data, teacher=load_teacher(teacher))
    assert space.num_classes == 5
    assert (
        "read as the teacher's class indices, among its 5 classes (0='tench', 1='goldfish', 2='shark')" in caplog.text
    )


def string_labels(labels):
    base = make_image_dataset(n=len(labels), size=8)
    return datasets.Dataset.from_dict({"image": list(base["image"]), "label": labels})


def test_string_labels_equal_up_to_case_are_refused_when_nothing_names_the_classes():
    data = string_labels(["cat", "Cat", "dog", "cat", "dog", "Cat"])
    with pytest.raises(LabelError, match=r"differ only in case.*'Cat' and 'cat'.*leave another without examples"):
        resolve_labels(data)


def test_string_labels_equal_up_to_case_map_to_the_named_class_with_a_warning(caplog):
    data = string_labels(["cat", "Cat", "dog", "cat", "dog", "Cat"])
    with caplog.at_level(logging.WARNING):
        space = resolve_labels(data, class_names=["cat", "dog"])
    assert space.class_names == ["cat", "dog"]
    assert "'Cat' and 'cat'" in caplog.text


def test_class_names_given_twice_are_refused_when_the_data_uses_them():
    data = string_labels(["crane", "dog", "crane", "dog"])
    with pytest.raises(LabelError, match=r"class_names holds a class name more than once.*'crane' and 'Crane'"):
        resolve_labels(data, class_names=["crane", "dog", "Crane"])


# ---- 3. images of every mode ----------------------------------------------------------------------------------------


def rgb(image):
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    return np.asarray(out)[0, 0].tolist()


def test_sixteen_bit_images_are_scaled_not_saturated(tmp_path):
    levels = np.array([[0, 4096, 32768, 65535]], dtype=np.uint16)
    expected = [0, 16, 128, 255]
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == expected
    path = tmp_path / "grey16.png"
    image.save(path)
    with Image.open(path) as read:
        assert np.asarray(to_rgb(read))[0, :, 1].tolist() == expected
    for mode, dtype in (("I;16B", ">u2"), ("I;16L", "<u2")):
        raw = Image.frombytes(mode, (4, 1), levels.astype(dtype).tobytes())
        assert np.asarray(to_rgb(raw))[0, :, 2].tolist() == expected
    # A 32-bit PNG-style "I" image read from a file holds 16-bit data.
    as_int = Image.fromarray(levels.astype(np.int32))
    assert as_int.mode == "I"
    assert np.asarray(to_rgb(as_int))[0, :, 0].tolist() == expected  # in memory, > 255: 16-bit


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("1", (2, 2), 1), [255, 255, 255]),
        (lambda: Image.new("L", (2, 2), 77), [77, 77, 77]),
        (lambda: Image.new("LA", (2, 2), (100, 255)), [100, 100, 100]),
        (lambda: Image.new("LA", (2, 2), (100, 0)), [255, 255, 255]),  # fully transparent: the white background
        (lambda: Image.new("LA", (2, 2), (100, 128)).convert("La"), [177, 177, 177]),
        (lambda: Image.new("RGBA", (2, 2), (255, 0, 0, 128)), [255, 127, 127]),
        (lambda: Image.new("RGBA", (2, 2), (255, 0, 0, 128)).convert("RGBa"), [255, 127, 127]),
        (lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), [255, 0, 0]),
        (lambda: Image.new("LAB", (2, 2), (128, 128, 128)), [119, 119, 119]),
        (lambda: Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)), [128, 128, 128]),  # F in [0, 1]
        (lambda: Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32)), [200, 200, 200]),  # F in [0, 255]
        (lambda: Image.fromarray(np.full((2, 2), 200, dtype=np.int32)), [200, 200, 200]),  # I in [0, 255]
        (lambda: Image.new("I;16", (2, 2), 65535), [255, 255, 255]),
    ],
)
def test_every_mode_becomes_the_right_rgb_colour(make, expected):
    assert rgb(make()) == expected


def test_palette_images_with_and_without_transparency():
    image = Image.new("P", (2, 2), 3)
    image.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 200, 100, 50])
    assert rgb(image) == [200, 100, 50]
    image.info["transparency"] = 3
    assert rgb(image) == [255, 255, 255]


@pytest.mark.parametrize(
    "image, pattern",
    [
        (Image.fromarray(np.array([[-1.0, 5.0]], dtype=np.float32)), r"mode 'F' .*-1\.\.5.*neither \[0, 1\] nor"),
        (Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32)), r"mode 'F' .*NaN"),
        (Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)), r"mode 'I' .*-5\.\.70000"),
        (Image.new("RGB", (0, 3)), r"is empty \(0x3 pixels\)"),
    ],
)
def test_modes_without_a_faithful_rgb_image_are_refused_naming_the_mode(image, pattern):
    with pytest.raises(ImageLoadError, match=pattern):
        to_rgb(image)


@pytest.mark.parametrize("feature_mode", [None, "RGB"])
def test_a_sixteen_bit_dataset_reaches_the_model_unsaturated(feature_mode):
    grey = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    data = datasets.Dataset.from_dict(
        {"image": [grey], "label": [0]},
        features=datasets.Features({"image": datasets.Image(mode=feature_mode), "label": datasets.Value("int64")}),
    )
    pixels = make_view(with_image_transforms(data, RAW, train=False)[0]["pixel_values"][None], RAW)
    assert torch.allclose(pixels, torch.full_like(pixels, 128 / 255), atol=1e-6)


# ---- 4. dataset shapes ----------------------------------------------------------------------------------------------


def reference_pixels(n=4):
    base = make_image_dataset(n=n, size=6)
    return base, torch.stack([e["pixel_values"] for e in with_image_transforms(base, RAW, train=False)])


def pixels_of(data):
    return torch.stack([e["pixel_values"] for e in with_image_transforms(data, RAW, train=False)])


def test_arrays_tensors_paths_and_bytes_give_the_same_pixels_as_images(tmp_path):
    base, expected = reference_pixels()
    images, labels = list(base["image"]), list(base["label"])
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    encoded = [p.read_bytes() for p in paths]
    shapes = {
        "numpy HWC uint8": [np.asarray(im) for im in images],
        "numpy CHW uint8": [np.moveaxis(np.asarray(im), -1, 0) for im in images],
        "float [0, 1]": [np.asarray(im).astype(np.float32) / 255 for im in images],
        "str path": [str(p) for p in paths],
        "bytes dict": [{"bytes": b, "path": None} for b in encoded],
    }
    for name, values in shapes.items():
        data = datasets.Dataset.from_dict({"image": values, "label": labels})
        got = pixels_of(data)
        assert torch.allclose(got, expected, atol=1 / 255 + 1e-6), name
    # pathlib paths and raw bytes, through the transform itself (Arrow stores them as strings / binary)
    from pat_hf.data.dataset_shapes import as_pil_image

    assert np.array_equal(np.asarray(as_pil_image(paths[0], "image")), np.asarray(images[0]))
    assert np.array_equal(np.asarray(as_pil_image(encoded[0], "image")), np.asarray(images[0]))
    # A torch tensor is channels-first even when its last axis could be channels too (a 3 x 6 x 4 crop).
    crop = np.asarray(images[0])[:, :4]
    tensor = torch.from_numpy(crop.copy()).permute(2, 0, 1)
    assert np.array_equal(np.asarray(as_pil_image(tensor, "image")), crop)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.stack([np.full((2, 2), 100, np.uint8), np.full((2, 2), 255, np.uint8)], -1), [100, 100, 100]),  # LA
        (np.stack([np.full((2, 2), 100, np.uint8), np.zeros((2, 2), np.uint8)], -1), [255, 255, 255]),  # clear
        (np.ones((2, 3), bool), [255, 255, 255]),
        (np.full((2, 3, 3), 0.5, np.float32), [128, 128, 128]),
        (np.full((2, 3), 40000, np.uint16), [156, 156, 156]),
        (np.full((3, 2, 5), 7, np.int64), [7, 7, 7]),  # CHW: the last axis cannot be channels
    ],
)
def test_arrays_of_every_layout_and_type_give_the_right_colour(array, expected):
    from pat_hf.data.dataset_shapes import as_pil_image

    assert np.asarray(to_rgb(as_pil_image(array, "image")))[0, 0].tolist() == expected


def test_a_streamed_dataset_trains_through_the_trainer(tmp_path):
    streamed = with_image_transforms(make_image_dataset(n=8, size=16).to_iterable_dataset(), VIEW, VIEW, train=True)
    run = trainer(tmp_path, data=streamed, max_steps=3)
    run.train()
    assert run.state.global_step == 3
    with pytest.raises(ValueError, match=r"IterableDataset \(streaming\).*set max_steps"):
        trainer(tmp_path, data=streamed, max_steps=-1)


def test_missing_images_are_refused_naming_column_and_rows():
    base = make_image_dataset(n=4, size=8)
    images = list(base["image"])
    data = datasets.Dataset.from_dict(
        {"image": [images[0], None, images[2], None], "label": [0, 1, 2, 0]}, features=base.features
    )
    with pytest.raises(DatasetError, match=r"2 rows of column 'image' .*no image \(None\): rows 1, 3"):
        with_image_transforms(data, VIEW, train=True)
    with pytest.raises(DatasetError, match=r"rows 0, 2"):  # the rows as the selection numbers them
        with_image_transforms(data.select([3, 2, 1]), VIEW, train=True)
    # Streamed: refused when the row is read.
    streamed = with_image_transforms(data.to_iterable_dataset(), VIEW, train=False)
    with pytest.raises(DatasetError, match=r"image in column 'image' is missing \(None\)"):
        list(streamed)


@pytest.mark.parametrize(
    "value, pattern",
    [
        ("/no/such/image.png", r"image file '/no/such/image.png' of column 'image' does not exist"),
        (b"not an image", r"Cannot read the image bytes in column 'image'"),
        (np.zeros((2, 3, 5, 7), dtype=np.uint8), r"array in column 'image' has shape \(2, 3, 5, 7\)"),
        (np.full((4, 4), -3.0), r"float64 array in column 'image' holds values -3\.\.-3"),
        (7, r"value in column 'image' is a int, not an image"),
    ],
)
def test_values_that_are_not_images_are_refused_naming_the_column(value, pattern):
    from pat_hf.data.dataset_shapes import as_pil_image

    with pytest.raises(ImageLoadError, match=pattern):
        as_pil_image(value, "image")


def test_a_dataset_dict_is_refused_naming_its_splits(tmp_path):
    base = make_image_dataset(n=4, size=16)
    splits = datasets.DatasetDict({"train": base, "validation": base})
    with pytest.raises(
        DatasetError, match=r"DatasetDict with the splits \['train', 'validation'\].*dataset\['train'\]"
    ):
        with_image_transforms(splits, VIEW, train=True)
    with pytest.raises(DatasetError, match=r"training dataset is a DatasetDict with the splits \['train', 'valid"):
        trainer(tmp_path, data=splits)
    with pytest.raises(DatasetError, match=r"evaluation dataset is a IterableDatasetDict"):
        PATDistillationTrainer(
            model=student(),
            teacher=tiny_teacher("vit"),
            args=tiny_args(tmp_path, max_steps=1),
            train_dataset=train_data(),
            eval_dataset=datasets.IterableDatasetDict({"test": base.to_iterable_dataset()}),
        )


def test_what_with_image_transforms_cannot_prepare_is_refused():
    images = list(make_image_dataset(n=2, size=8)["image"])
    with pytest.raises(DatasetError, match=r"takes a datasets.Dataset or IterableDataset, got list"):
        with_image_transforms([{"image": im, "label": 0} for im in images], VIEW, train=True)
    torch_data = torch.utils.data.TensorDataset(torch.zeros(2, 3, 8, 8))
    with pytest.raises(DatasetError, match=r"got TensorDataset"):
        with_image_transforms(torch_data, VIEW, train=True)
    # Streamed rows whose columns were not known beforehand: the missing column is named when read.
    generated = datasets.IterableDataset.from_generator(lambda: iter([{"img": images[0], "label": 0}]))
    with pytest.raises(DatasetError, match=r"no column \['image'\]; its rows hold \['img', 'label'\]"):
        list(with_image_transforms(generated, VIEW, train=False))


def test_raw_images_given_to_the_trainer_are_refused_before_training(tmp_path):
    raw = make_image_dataset(n=8, size=16)
    with pytest.raises(DatasetError, match=r"training dataset has no 'pixel_values' \(its columns are \['image', 'l"):
        trainer(tmp_path, data=raw).train()
    assert not (tmp_path / "out" / "pat_hf_run.json").exists()  # refused before the run claimed its folder
    own = raw.with_transform(
        lambda b: {"pixel_values": [torch.zeros(3, 16, 16) for _ in b["image"]], "labels": b["label"]}
    )
    run = trainer(tmp_path, data=own)  # a transform of the user's own is trusted
    run.train()
    assert run.state.global_step == 2


# ---- 7. checkpoints without their file list ------------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path):
    run = trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    run.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    return out


def strip_and_zero(checkpoint: Path) -> None:
    """An incomplete copy: the file list missing, the weights zero-filled (same size, so structurally fine)."""
    (checkpoint / FILE_LIST_NAME).unlink()
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:header] + bytes(len(data) - header))


def test_a_checkpoint_without_its_file_list_is_skipped_like_a_broken_one(tmp_path, two_checkpoints, caplog):
    strip_and_zero(two_checkpoints / "checkpoint-4")
    problems = verify_checkpoint(str(two_checkpoints / "checkpoint-4"))
    assert len(problems) == 1 and f"{FILE_LIST_NAME}: missing" in problems[0] and "incomplete" in problems[0]
    with pytest.raises(CheckpointError, match=rf"incomplete or corrupted:\n .*{FILE_LIST_NAME}: missing"):
        trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=2).train(
            resume_from_checkpoint=str(two_checkpoints / "checkpoint-4")
        )
    resumed = trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    assert "Not resuming from" in caplog.text and "checkpoint-4" in caplog.text
    assert resumed.state.global_step == 6


def test_a_newest_checkpoint_holding_only_weights_is_skipped(tmp_path, two_checkpoints, caplog):
    newest = two_checkpoints / "checkpoint-4"
    for item in newest.iterdir():
        if item.name != "model.safetensors":
            item.unlink()
    resumed = trainer(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    with caplog.at_level(logging.WARNING):
        resumed.train(resume_from_checkpoint=True)
    assert "Not resuming from" in caplog.text and FILE_LIST_NAME in caplog.text
    assert resumed.state.global_step == 6


def test_only_a_0_1_manifest_makes_a_missing_file_list_legacy(two_checkpoints):
    checkpoint = two_checkpoints / "checkpoint-2"
    (checkpoint / FILE_LIST_NAME).unlink()
    manifest_path = checkpoint / "distill_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for version, legacy in (("0.1.0", True), ("0.1", True), ("0.2.0", False), ("0.10.0", False), (None, False)):
        manifest["pat_hf_version"] = version
        manifest_path.write_text(json.dumps(manifest))
        problems = verify_checkpoint(str(checkpoint))
        assert (problems == []) == legacy, (version, problems)
    manifest_path.unlink()
    assert any(FILE_LIST_NAME in p for p in verify_checkpoint(str(checkpoint)))


# ---- 9. settings refused before long work --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps must be an integer >= 1, got 0"),
        ({"per_device_train_batch_size": 0}, r"per_device_train_batch_size must be an integer >= 1"),
        ({"per_device_eval_batch_size": -2}, r"per_device_eval_batch_size must be an integer >= 1"),
        ({"save_strategy": "steps", "save_steps": 0}, r"save_strategy='steps' needs save_steps > 0"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0"),
        ({"dataloader_num_workers": -1}, r"dataloader_num_workers must be >= 0"),
        ({"output_dir": ""}, r"output_dir is empty"),
        ({"hub_timeout": 0}, r"hub_timeout must be > 0"),
        ({"seed": -1}, r"seed must be in \[0, 2\*\*32 - 1\]"),
    ],
)
def test_loop_settings_are_refused_by_the_arguments(tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        PATTrainingArguments(**{"output_dir": str(tmp_path / "out"), "use_cpu": True, "report_to": [], **overrides})


def test_output_paths_that_cannot_be_folders_are_refused(tmp_path):
    (tmp_path / "a-file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    cases = {
        str(tmp_path / "a-file" / "out"): r"cannot be created: .*a-file is a file, not a folder",
        str(tmp_path / "a-file" / "x" / "y"): r"a-file is a file, not a folder",
        str(tmp_path / "dangling"): r"is a symbolic link to .*nowhere.*which does not exist",
        str(tmp_path / "dangling" / "run"): r"dangling is a symbolic link",
        "  ": r"output_dir is empty",
    }
    for path, pattern in cases.items():
        with pytest.raises(OutputDirError, match=pattern):
            check_output_dir(path)
    with pytest.raises(OutputDirError, match=r"a-file is a file"):
        trainer(tmp_path, output_dir=str(tmp_path / "a-file" / "out"))
    check_output_dir(str(tmp_path / "new" / "deeper"))  # missing folders under a writable one are fine


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into a read-only folder (no refusal due)"
)
def test_a_read_only_output_folder_is_refused(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for path in (folder, folder / "run"):
            with pytest.raises(OutputDirError, match=r"is not writable by this user"):
                check_output_dir(str(path))
    finally:
        folder.chmod(0o755)


def test_a_features_only_student_is_refused(tmp_path):
    with pytest.raises(StudentLoadError, match=r"features_only model \(FeatureListNet\).*without features_only=True"):
        trainer(tmp_path, model=timm.create_model("test_resnet", features_only=True))


def test_the_teacher_as_its_own_student_is_refused_before_it_is_frozen(tmp_path):
    teacher = tiny_teacher("vit")
    with pytest.raises(StudentLoadError, match=r"student and the teacher are the same object"):
        trainer(tmp_path, model=teacher, teacher=teacher)
    assert all(p.requires_grad for p in teacher.parameters())  # refused before the teacher was frozen
    wrapped = tf.TimmWrapperForImageClassification(tf.TimmWrapperConfig(architecture="test_resnet", num_labels=3))
    with pytest.raises(StudentLoadError, match=r"one inside the other"):
        trainer(tmp_path, model=wrapped.timm_model, teacher=wrapped)
    teacher2 = tiny_teacher("vit")
    model2 = student()
    model2.register_parameter("borrowed", teacher2.classifier.weight)
    with pytest.raises(StudentLoadError, match=r"shares 1 parameters with the teacher \(e.g. 'borrowed'\)"):
        trainer(tmp_path, model=model2, teacher=teacher2)


def test_a_teacher_built_for_one_channel_is_refused(tmp_path):
    config = tf.ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_channels=1, num_labels=3,
    )  # fmt: skip
    with pytest.raises(TeacherLoadError, match=r"built for 1-channel input \(config.num_channels=1\)"):
        trainer(tmp_path, teacher=tf.ViTForImageClassification(config))


def test_a_batch_larger_than_the_data_with_drop_last_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"8 rows, fewer than one batch \(16 per device.*dataloader_drop_last"):
        trainer(tmp_path, dataloader_drop_last=True, per_device_train_batch_size=16)
    trainer(tmp_path, dataloader_drop_last=False, per_device_train_batch_size=16)  # one short batch: fine


def test_pretrained_weights_offline_name_the_model_and_the_setting(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StudentLoadError, match=r"student 'test_resnet' \(pretrained=True.*HF_HUB_OFFLINE is set"):
        create_student("test_resnet", num_classes=3, pretrained=True)
    assert isinstance(create_student("test_resnet", num_classes=3, pretrained=False), torch.nn.Module)
