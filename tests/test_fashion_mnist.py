"""End to end on real data: a few hundred Fashion-MNIST images from Debian's dataset-fashion-mnist."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

from pat_hf import (
    ImageView,
    PATDistillationTrainer,
    PATTrainingArguments,
    create_student,
    load_fashion_mnist,
    with_image_transforms,
)
from pat_hf.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, balanced_subset
from pat_hf.data.views import make_view

HAVE_DATA = os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz"))
# CI installs the package: there a missing file is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not HAVE_DATA and not os.environ.get("CI"), reason="apt-get install dataset-fashion-mnist"
)


def test_load_fashion_mnist_reads_the_idx_files():
    test = load_fashion_mnist("test")
    assert len(test) == 10_000
    assert test.features["label"].names == FASHION_MNIST_CLASSES
    example = test[0]
    assert example["image"].size == (28, 28) and example["image"].mode == "L"
    assert example["label"] == 9  # the first test image is an ankle boot
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("validation")


def test_missing_data_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=str(tmp_path))


def test_teacher_then_kd_student_on_real_images(tmp_path):
    train_full = load_fashion_mnist("train")
    teacher_train = balanced_subset(train_full, 1000, seed=1)
    student_train = balanced_subset(train_full, 300, seed=2)
    test = load_fashion_mnist("test").select(range(300))

    # 1. A transformers teacher trained with distill_method="none".
    processor = ViTImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.286] * 3, image_std=[0.353] * 3)
    teacher_view = ImageView.from_image_processor(processor)
    torch.manual_seed(0)
    teacher = ResNetForImageClassification(
        ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                     downsample_in_first_stage=False, num_labels=10, id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
                     label2id={n: i for i, n in enumerate(FASHION_MNIST_CLASSES)})
    )  # fmt: skip
    common = dict(
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", per_device_eval_batch_size=100, seed=0
    )
    teacher_trainer = PATDistillationTrainer(
        model=teacher,
        args=PATTrainingArguments(str(tmp_path / "teacher"), distill_method="none", num_train_epochs=3,
                                  per_device_train_batch_size=32, learning_rate=3e-3, **common),
        train_dataset=with_image_transforms(teacher_train, teacher_view, train=True, min_crop_scale=0.7),
        processing_class=processor,
    )  # fmt: skip
    teacher_trainer.train()
    teacher_acc = teacher_trainer.evaluate(with_image_transforms(test, teacher_view, train=False))["eval_accuracy"]
    assert teacher_acc > 0.6, teacher_acc

    # 2. A timm student distilled from it on fewer images.
    student = create_student("test_resnet", num_classes=10, img_size=28, pretrained_cfg_overlay={"crop_pct": 1.0})
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=PATTrainingArguments(str(tmp_path / "student"), distill_method="kd", num_train_epochs=3,
                                  per_device_train_batch_size=32, learning_rate=3e-3, **common),
        train_dataset=with_image_transforms(student_train, view, teacher_view, train=True, min_crop_scale=0.7),
        eval_dataset=with_image_transforms(test, view, train=False),
        teacher_image_processor=processor,
    )  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] > 0.3, metrics  # chance is 0.1
    assert metrics["eval_top5_accuracy"] > metrics["eval_accuracy"]
    assert metrics["eval_loss_kd"] > 0
    trainer.save_model()

    # 3. The export predicts exactly like the trained student.
    exported = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True).eval()
    # The evaluation data is uint8; the student's view is made as the trainer makes it on the device.
    images = torch.stack([trainer.eval_dataset[i]["pixel_values"] for i in range(16)])
    batch = make_view(images, view)
    with torch.no_grad():
        torch.testing.assert_close(exported(batch), trainer.student.eval()(batch))
    config = json.load(open(tmp_path / "student" / "config.json"))
    assert config["label_names"] == FASHION_MNIST_CLASSES
