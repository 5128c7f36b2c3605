"""Bad input fails early with a message that says what is wrong and how to fix it."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTModel

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
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
