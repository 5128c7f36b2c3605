"""Bad input fails early with a message that says what is wrong and how to fix it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTModel

from pat_hf import ImageView, PATDistillationTrainer, create_student, load_teacher, with_image_transforms
from support.tiny import make_image_dataset, tiny_args, tiny_teacher


def test_unknown_method(tmp_path):
    with pytest.raises(ValueError, match=r"distill_method='hinton_kd' .* kd, none"):
        tiny_args(tmp_path, distill_method="hinton_kd")


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("temperature", 0.0, "temperature must be > 0"),
        ("temperature", -1.0, "temperature must be > 0"),
        ("ce_weight", -0.5, "ce_weight must be >= 0"),
        ("kd_weight", -1.0, "kd_weight must be >= 0"),
        ("label_smoothing", 1.0, r"label_smoothing must be in \[0, 1\)"),
    ],
)
def test_out_of_range_settings(tmp_path, field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_args(tmp_path, **{field: value})


def test_label_smoothing_factor_is_honoured(tmp_path):
    assert tiny_args(tmp_path, label_smoothing_factor=0.2).label_smoothing == 0.2


def test_unknown_student_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown timm student architecture 'resnet181'.*Did you mean .*resnet18"):
        create_student("resnet181", num_classes=3)


def test_student_path_without_prefix_is_explained():
    with pytest.raises(ValueError, match="hf-hub:org/model"):
        create_student("org/model", num_classes=3)


def test_student_name_in_trainer_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown timm student"):
        PATDistillationTrainer(
            model="not_a_model",
            teacher=tiny_teacher("vit"),
            args=tiny_args(tmp_path),
            train_dataset=make_image_dataset(),
        )


def test_teacher_that_is_not_an_image_classifier(tmp_path):
    backbone = ViTModel(
        ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    with pytest.raises(ValueError, match="teacher must be a transformers image classifier"):
        PATDistillationTrainer(
            model="test_resnet", teacher=backbone, args=tiny_args(tmp_path), train_dataset=make_image_dataset()
        )
    with pytest.raises(ValueError, match="teacher must be a transformers image classifier"):
        PATDistillationTrainer(
            model="test_resnet",
            teacher=torch.nn.Linear(3, 3),
            args=tiny_args(tmp_path),
            train_dataset=make_image_dataset(),
        )


def test_missing_teacher_for_kd(tmp_path):
    with pytest.raises(ValueError, match="needs teacher="):
        PATDistillationTrainer(model="test_resnet", args=tiny_args(tmp_path), train_dataset=make_image_dataset())


def test_class_count_mismatch_without_names(tmp_path):
    with pytest.raises(ValueError, match="teacher predicts 5 classes but the dataset has 3"):
        PATDistillationTrainer(
            model="test_resnet",
            teacher=tiny_teacher("vit", num_labels=5),
            args=tiny_args(tmp_path),
            train_dataset=make_image_dataset(),
        )


def test_class_names_that_do_not_match(tmp_path):
    teacher = tiny_teacher("vit", id2label={0: "cat", 1: "dog", 2: "horse"})
    with pytest.raises(ValueError, match=r"does not know 1 of the dataset's 3 classes: 'bird'"):
        PATDistillationTrainer(
            model="test_resnet", teacher=teacher, args=tiny_args(tmp_path), train_dataset=make_image_dataset()
        )


def test_teacher_with_more_classes_is_matched_by_name(tmp_path):
    teacher = tiny_teacher("vit", num_labels=5, id2label={0: "horse", 1: "Bird", 2: "fish", 3: "dog", 4: "CAT"})
    trainer = PATDistillationTrainer(
        model="test_resnet", teacher=teacher, args=tiny_args(tmp_path), train_dataset=make_image_dataset()
    )
    assert trainer.teacher.class_index.tolist() == [4, 3, 1]


def test_student_with_wrong_number_of_classes(tmp_path):
    student = create_student("test_resnet", num_classes=10)
    with pytest.raises(ValueError, match="student has 10 outputs but the dataset has 3 classes"):
        PATDistillationTrainer(
            model=student, teacher=tiny_teacher("vit"), args=tiny_args(tmp_path), train_dataset=make_image_dataset()
        )


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="PATTrainingArguments"):
        PATDistillationTrainer(model="test_resnet", teacher=tiny_teacher("vit"), args=TrainingArguments(str(tmp_path)))


def test_dataset_without_image_or_label_column():
    dataset = make_image_dataset().rename_column("image", "img")
    student = create_student("test_resnet", num_classes=3)
    with pytest.raises(ValueError, match=r"no column 'image'; its columns are \['img', 'label'\].*--image_column_name"):
        with_image_transforms(dataset, ImageView.from_timm(student), train=True)
    with pytest.raises(ValueError, match="no column 'target'"):
        with_image_transforms(make_image_dataset(), ImageView.from_timm(student), train=True, label_column="target")


def test_student_built_with_unrecorded_arguments_is_caught(tmp_path):
    """A student whose export would not rebuild the same architecture fails before training."""
    student = create_student("test_resnet", num_classes=3)
    student.fc = torch.nn.Linear(student.num_features, 3, bias=False)  # hand surgery timm cannot reproduce
    with pytest.raises(ValueError, match="export would not load back"):
        PATDistillationTrainer(
            model=student, teacher=tiny_teacher("vit"), args=tiny_args(tmp_path), train_dataset=make_image_dataset()
        )


class StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _train_with_checkpoints(tmp_path, teacher_family: str, method: str = "kd"):
    dataset = make_image_dataset()
    torch.manual_seed(0)
    student = create_student("test_resnet", num_classes=3, img_size=20)
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher(teacher_family) if method != "none" else None,
        args=tiny_args(tmp_path, distill_method=method, save_strategy="steps", save_steps=3),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
    )
    return trainer


def test_output_dir_with_another_runs_checkpoints_is_refused_and_kept(tmp_path):
    first = _train_with_checkpoints(tmp_path, "vit")
    first.train()
    ckpt = os.path.join(first.args.output_dir, "checkpoint-3")
    before = {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)}
    other = _train_with_checkpoints(tmp_path, "swin")  # another teacher, same output_dir
    with pytest.raises(ValueError, match=r"(?s)holds checkpoints of another run.*teacher.*Choose another output_dir"):
        other.train()
    with pytest.raises(ValueError, match=r"(?s)Cannot resume from .*belongs to another run"):
        other.train(resume_from_checkpoint=True)
    assert {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)} == before


def test_resume_without_checkpoint_is_explained(tmp_path):
    trainer = _train_with_checkpoints(tmp_path, "vit")
    with pytest.raises(ValueError, match="holds no checkpoint-N folder"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_continues_the_run_exactly(tmp_path):
    full = _train_with_checkpoints(tmp_path / "full", "vit")
    full.args.num_train_epochs = 2
    full.train()
    reference = {k: v.clone() for k, v in full.student.state_dict().items()}

    part = _train_with_checkpoints(tmp_path / "part", "vit")
    part.args.num_train_epochs = 2
    part.add_callback(StopAfter(3))  # interrupted right after the first checkpoint, same schedule
    part.train()
    assert part.state.global_step == 3
    resumed = _train_with_checkpoints(tmp_path / "part", "vit")
    resumed.args.num_train_epochs = 2
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    for key, value in resumed.student.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)


# ---- the teacher: one loader, one clear message naming the path and the file -----------------------------------


@pytest.fixture
def saved_teacher(tmp_path):
    from transformers import ViTImageProcessor

    path = tmp_path / "teacher"
    tiny_teacher("vit", id2label={0: "cat", 1: "dog", 2: "bird"}).save_pretrained(path)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def _break_teacher(path, how):
    from support.files import truncate

    if how == "missing":
        return path.parent / "no-such-teacher"
    if how == "a file":
        return path / "config.json"
    if how == "no config":
        (path / "config.json").unlink()
    elif how == "corrupt config":
        (path / "config.json").write_text('{"model_type": "vit",')
    elif how == "truncated weights":
        truncate(path / "model.safetensors")
    elif how == "no weights":
        (path / "model.safetensors").unlink()
    elif how == "corrupt processor":
        (path / "preprocessor_config.json").write_text("{")
    elif how == "text model":
        from transformers import BertConfig, BertForSequenceClassification

        shutil.rmtree(path)
        config = BertConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, vocab_size=50
        )
        BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("how", "pattern"),
    [
        ("missing", r"no-such-teacher': no such folder"),
        ("a file", r"config.json': it is a file, not a model folder"),
        (
            "no config",
            r"the folder has no config.json \(it holds \['model.safetensors', 'preprocessor_config.json'\]\)",
        ),
        ("corrupt config", r"teacher/config.json is not valid JSON \(.*line 1"),
        ("truncated weights", r"teacher/model.safetensors is truncated \(\d+ bytes; its header says \d+\)"),
        ("no weights", r"the folder has no weights \(model.safetensors or pytorch_model.bin\)"),
        ("corrupt processor", r"teacher/preprocessor_config.json is not valid JSON"),
        ("text model", r"it is a BertForSequenceClassification \(bert\), not an image classifier"),
    ],
)
def test_a_broken_teacher_folder_is_named_before_anything_is_built(tmp_path, saved_teacher, how, pattern):
    from pat_hf.errors import TeacherLoadError

    path = _break_teacher(saved_teacher, how)
    with pytest.raises(TeacherLoadError, match=r"Cannot load the teacher '.*" + pattern):
        PATDistillationTrainer(
            model="test_resnet", teacher=str(path), args=tiny_args(tmp_path), train_dataset=make_image_dataset()
        )
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_a_teacher_hub_id_out_of_reach_says_so(tmp_path):
    from pat_hf.errors import TeacherLoadError

    with pytest.raises(
        TeacherLoadError, match=r"'org/no-such-model': there is no local folder of that name, and as a Hub id"
    ):
        load_teacher("org/no-such-model")


def test_a_teacher_without_image_processor_falls_back_to_its_config(saved_teacher, caplog):
    (saved_teacher / "preprocessor_config.json").unlink()
    teacher = load_teacher(str(saved_teacher))
    assert teacher.view.size == (16, 16) and teacher.view_source == "config"
    assert "No image processor for the teacher: assuming 16x16" in caplog.text


# ---- labels: type and range from the label column, before training ---------------------------------------------


def _relabel(dataset, labels, feature=None):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": feature or datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": list(dataset["image"]), "label": labels}, features=features)


def _trainer_for(tmp_path, train, teacher=None, eval_dataset=None, method="kd", **kwargs):
    student = create_student("test_resnet", num_classes=3, img_size=16)
    view = ImageView.from_timm(student)
    teacher = teacher if teacher is not None else tiny_teacher("vit") if method != "none" else None
    return PATDistillationTrainer(
        model=student if "model" not in kwargs else kwargs.pop("model"),
        teacher=teacher,
        args=tiny_args(tmp_path, distill_method=method, per_device_train_batch_size=4, max_steps=1),
        train_dataset=with_image_transforms(train, view, None, train=True),
        eval_dataset=None if eval_dataset is None else with_image_transforms(eval_dataset, view, None, train=False),
        **kwargs,
    )


@pytest.mark.parametrize("method", ["kd", "none"])
def test_one_based_integer_labels_are_refused_with_the_fix(tmp_path, method):
    from pat_hf.errors import LabelError

    dataset = make_image_dataset(n=12, size=16)
    one_based = _relabel(dataset, [label + 1 for label in dataset["label"]])
    with pytest.raises(LabelError, match=r"(?s)look 1-based.*dataset.map\(lambda e: \{'label': e\['label'\] - 1\}\)"):
        _trainer_for(tmp_path, one_based, method=method)


@pytest.mark.parametrize(
    ("labels", "feature", "pattern"),
    [
        (
            [0, 1, 2, -1] * 3,
            None,
            r"3 rows of column 'label' .* have a negative label \(-1; -1 is `datasets`' 'no label'\)",
        ),
        ([0, 1, 2, 7] * 3, None, r"go up to 7, but there are 3 classes \(the teacher's 3 classes\), numbered 0 to 2"),
        ([0.0, 1.0, 2.0] * 4, "float32", r"are float, not class indices or names: cast them"),
        ([[0], [1], [2]] * 4, "list", r"are list<item: int64>, not class indices or names: use one class index"),
        ([0, 1, None] * 4, None, r"4 rows of column 'label' of the training data have no label \(None\)"),
    ],
)
def test_labels_of_the_wrong_type_or_range_are_refused(tmp_path, labels, feature, pattern):
    import datasets

    from pat_hf.errors import LabelError

    features = {None: None, "float32": datasets.Value("float32"), "list": datasets.Sequence(datasets.Value("int64"))}
    bad = _relabel(make_image_dataset(n=12, size=16), labels, features[feature])
    with pytest.raises(LabelError, match=pattern):
        _trainer_for(tmp_path, bad)


def test_evaluation_labels_are_checked_against_the_training_classes(tmp_path):
    import datasets

    from pat_hf.errors import LabelError

    train = make_image_dataset(n=12, size=16)
    other = make_image_dataset(n=6, size=16, names=["dog", "cat", "bird"])
    with pytest.raises(
        LabelError, match=r"evaluation data's classes \['dog', 'cat', 'bird'\] differ from the training"
    ):
        _trainer_for(tmp_path, train, eval_dataset=other)
    wide = _relabel(make_image_dataset(n=6, size=16), [0, 1, 5, 0, 1, 2], datasets.ClassLabel(num_classes=6))
    with pytest.raises(
        LabelError, match=r"labels in column 'label' of the evaluation data go up to 5, but there are 3"
    ):
        _trainer_for(tmp_path, _relabel(train, list(train["label"])), eval_dataset=wide)


def test_string_labels_are_mapped_to_the_teachers_classes_by_name(tmp_path):
    dataset = make_image_dataset(n=12, size=16)
    names = ["CAT", "Dog", "bird"]
    strings = _relabel(dataset, [names[i] for i in dataset["label"]], __import__("datasets").Value("string"))
    teacher = tiny_teacher("vit", id2label={0: "bird", 1: "cat", 2: "dog"})
    trainer = _trainer_for(tmp_path, strings, teacher=teacher)
    assert trainer.class_names == ["bird", "cat", "dog"] and trainer.teacher.class_index is None
    labels = [trainer.train_dataset[i]["labels"] for i in range(3)]
    assert labels == [1, 2, 0]  # CAT -> cat (1), Dog -> dog (2), bird (0)
    trainer.train()


def test_string_labels_without_teacher_names_use_the_sorted_names_and_say_so(tmp_path, caplog):
    dataset = make_image_dataset(n=12, size=16)
    strings = _relabel(
        dataset, [["cat", "dog", "bird"][i] for i in dataset["label"]], __import__("datasets").Value("string")
    )
    trainer = _trainer_for(tmp_path, strings)
    assert trainer.class_names == ["bird", "cat", "dog"]
    assert "mapped to their sorted unique names ['bird', 'cat', 'dog']" in caplog.text
    assert [trainer.train_dataset[i]["labels"] for i in range(3)] == [1, 2, 0]


def test_a_string_label_the_teacher_does_not_know_is_named(tmp_path):
    from pat_hf.errors import LabelError

    dataset = make_image_dataset(n=12, size=16)
    strings = _relabel(
        dataset, [["cat", "dog", "horse"][i] for i in dataset["label"]], __import__("datasets").Value("string")
    )
    teacher = tiny_teacher("vit", id2label={0: "bird", 1: "cat", 2: "dog"})
    with pytest.raises(LabelError, match=r"holds the class names \['horse'\], which the teacher does not know"):
        _trainer_for(tmp_path, strings, teacher=teacher)


@pytest.mark.parametrize("which", ["train", "eval"])
def test_an_empty_dataset_is_refused(tmp_path, which):
    from pat_hf.errors import DatasetError

    empty = make_image_dataset(n=6, size=16).select([])
    with pytest.raises(DatasetError, match=r"is empty \(0 rows\)"):
        if which == "train":
            _trainer_for(tmp_path, empty)
        else:
            _trainer_for(
                tmp_path, make_image_dataset(n=6, size=16), eval_dataset=make_image_dataset(n=3).filter(lambda e: False)
            )


def test_a_truncated_image_names_its_file_or_row(tmp_path):
    import datasets

    from pat_hf.errors import ImageLoadError
    from support.files import truncate

    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    for i, image in enumerate(make_image_dataset(n=3, size=16)["image"]):
        image.save(folder / f"{i}.png")
    truncate(folder / "1.png", 0.3)
    files = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images"), split="train")
    view = ImageView(size=(16, 16))
    prepared = with_image_transforms(files, view, train=False, label_column=None)
    prepared[0]
    with pytest.raises(
        ImageLoadError, match=r"Cannot read the image in file '.*cat/1.png' of column 'image' \(OSError"
    ):
        prepared[1]
    in_memory = make_image_dataset(n=4, size=16).cast_column("image", datasets.Image(decode=False))
    blobs = list(in_memory["image"])
    blobs[2] = {"bytes": blobs[2]["bytes"][:40], "path": None}
    broken = datasets.Dataset.from_dict({"image": blobs, "label": in_memory["label"]}, features=in_memory.features)
    broken = broken.cast_column("image", datasets.Image())
    with pytest.raises(ImageLoadError, match=r"image in row 2 of column 'image'"):
        with_image_transforms(broken, view, train=False, label_column=None)[2]


# ---- views: one place, checked --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"size": (16, 16), "crop_pct": 0}, r"crop_pct must be a fraction in \(0, 2\]"),
        ({"size": (16, 16), "crop_pct": 87.5}, r"crop_pct must be a fraction"),
        ({"size": (16, 16), "interpolation": "cubic"}, r"Unknown ImageView interpolation 'cubic'; use one of"),
        ({"size": (0, 16)}, r"size must be \(height, width\), two positive integers"),
        ({"size": (16, 16), "std": (0.2, 0.0, 0.2)}, r"std must be 1 or 3 positive numbers"),
        ({"size": (16, 16), "mean": (0.5, 0.5)}, r"mean must be 1 or 3 finite numbers"),
    ],
)
def test_imageview_refuses_values_that_would_fail_later(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ImageView(**kwargs)
    assert ImageView(size=16, mean=0.5, interpolation="BICUBIC").mean == (0.5, 0.5, 0.5)


def test_a_teacher_built_in_memory_takes_the_datasets_view_without_warning(tmp_path, caplog):
    teacher = tiny_teacher("vit")
    teacher_view = ImageView(size=(16, 16), mean=(0.3,) * 3, std=(0.2,) * 3)
    student = create_student("test_resnet", num_classes=3, img_size=16)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=tiny_args(tmp_path),
        train_dataset=with_image_transforms(
            make_image_dataset(), ImageView.from_timm(student), teacher_view, train=True
        ),
    )
    assert trainer.teacher.view == teacher_view and trainer.teacher.view_source == "data"
    assert "No image processor" not in caplog.text
    # From its config (the README's way) the same holds.
    assert ImageView.from_config(teacher.config).size == (16, 16)


def test_a_dataset_made_for_another_teacher_normalisation_is_refused_naming_both(tmp_path):
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    student = create_student("test_resnet", num_classes=3, img_size=16)
    train = with_image_transforms(
        make_image_dataset(), ImageView.from_timm(student), ImageView(size=(16, 16)), train=True
    )  # ImageNet statistics
    with pytest.raises(
        ValueError,
        match=r"(?s)prepared for the teacher with 16x16, mean \(0.485, .*image_processor says 16x16, mean \(0.5, 0.5, 0.5\)",
    ):
        PATDistillationTrainer(
            model=student, teacher=tiny_teacher("vit"), args=tiny_args(tmp_path), train_dataset=train,
            teacher_image_processor=processor,
        )  # fmt: skip


def test_a_student_given_by_name_exports_the_view_it_was_trained_on(tmp_path, caplog):
    import json

    view = ImageView(size=(24, 24), mean=(0.4,) * 3, std=(0.3,) * 3, interpolation="bilinear")
    eval_view = ImageView(size=(24, 24), mean=(0.4,) * 3, std=(0.3,) * 3, interpolation="bilinear", crop_pct=0.9)
    dataset = make_image_dataset(n=8, size=24)
    trainer = PATDistillationTrainer(
        model="test_resnet",
        teacher=tiny_teacher("vit"),
        args=tiny_args(tmp_path, per_device_train_batch_size=4, max_steps=1),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
        eval_dataset=with_image_transforms(dataset, eval_view, None, train=False),
    )
    assert "now record what it is trained on" in caplog.text
    trainer.train()
    trainer.save_model()
    cfg = json.load(open(tmp_path / "out" / "config.json"))["pretrained_cfg"]
    assert (cfg["input_size"], cfg["mean"], cfg["std"]) == ([3, 24, 24], [0.4] * 3, [0.3] * 3)
    assert (cfg["interpolation"], cfg["crop_pct"]) == ("bilinear", 0.9)


@pytest.mark.parametrize("case", ["fixed size", "patch size", "train vs eval", "in_chans"])
def test_student_view_mismatches_that_cannot_train_are_refused(tmp_path, case):
    dataset = make_image_dataset(n=8, size=16)
    if case == "fixed size":
        student = create_student("vit_tiny_patch16_224", num_classes=3, img_size=32, depth=1, embed_dim=48, num_heads=2)
        train_view, eval_view = ImageView(size=48), None
        pattern = r"takes 32x32 inputs only, but the data was prepared at 48x48.*img_size=48"
    elif case == "patch size":
        student, train_view, eval_view = (
            create_student("test_vit", num_classes=3, img_size=16),
            ImageView(size=24),
            None,
        )
        pattern = r"cuts its input into 16x16 patches, but the data was prepared at 24x24"
    elif case == "train vs eval":
        student = create_student("test_resnet", num_classes=3, img_size=16)
        train_view, eval_view = ImageView(size=16), ImageView(size=16, mean=0.5)
        pattern = r"training data was prepared for the student with .* but the evaluation data with"
    else:
        student = create_student("test_resnet", num_classes=3, img_size=16, in_chans=1)
        train_view, eval_view = ImageView(size=16), None
        pattern = r"built with in_chans=1, but with_image_transforms feeds RGB images"
    with pytest.raises(ValueError, match=pattern):
        PATDistillationTrainer(
            model=student,
            teacher=tiny_teacher("vit"),
            args=tiny_args(tmp_path),
            train_dataset=with_image_transforms(dataset, train_view, None, train=True),
            eval_dataset=None if eval_view is None else with_image_transforms(dataset, eval_view, None, train=False),
        )


# ---- arguments, model card, logged parts ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_temperature_must_be_finite(tmp_path, value):
    with pytest.raises(ValueError, match="temperature must be > 0 and finite"):
        tiny_args(tmp_path, temperature=value)


def test_model_card_of_a_max_steps_run_reports_the_epochs_trained_and_names_an_in_memory_teacher_once(tmp_path):
    trainer = _trainer_for(tmp_path, make_image_dataset(n=16, size=16))
    trainer.args.max_steps, trainer.args.num_train_epochs = 2, 50
    trainer.train()
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- epochs: 0.5" in card and "- epochs: 50" not in card  # 2 steps of 4 per epoch
    assert "teacher `ViTForImageClassification` with" in card and "(ViTForImageClassification)" not in card


def test_the_docs_list_exactly_what_each_method_logs():
    from pat_hf.methods import loss_parts_table

    docs = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "index.md")).read()
    table = docs.split("<!-- loss-parts-table: start -->\n")[1].split("\n<!-- loss-parts-table: end -->")[0]
    assert table == loss_parts_table()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "kd", "dkd", "dist", "fitnet", "ofa", "pat", "rsd"])
def test_each_method_logs_exactly_its_declared_parts(tmp_path, method):
    from pat_hf.methods import get_method

    extra = (
        dict(pat_dim=32, pat_num_heads=4, pat_prompt_stages=[1, 3], ofa_stages=[2, 4])
        if method in ("ofa", "pat")
        else {}
    )
    student = create_student("resnet10t", num_classes=3, stem_width=8, channels=(8, 16, 32, 64))
    view = ImageView.from_timm(student)
    data = make_image_dataset(n=4, size=32)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher("convnext") if method != "none" else None,
        args=tiny_args(tmp_path, distill_method=method, per_device_train_batch_size=4, max_steps=1, **extra),
        train_dataset=with_image_transforms(data, view, ImageView(size=(32, 32)), train=True),
        eval_dataset=with_image_transforms(data, view, None, train=False),
    )
    trainer.train()
    metrics = trainer.evaluate()
    cls = get_method(method)
    logged = {k[len("loss_") :] for h in trainer.state.log_history for k in h if k.startswith("loss_")}
    declared = set()
    for name in cls.loss_parts:
        declared |= {name.format(stage=s) for s in trainer.args.ofa_stages} if "{stage}" in name else {name}
    assert logged == declared
    assert {k[len("eval_loss_") :] for k in metrics if k.startswith("eval_loss_")} == set(cls.eval_loss_parts())
