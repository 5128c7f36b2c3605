"""A checkpoint written by pat_hf 0.1.0 (before the package's layout changed) still resumes, exactly.

``tests/data/legacy_v0_1_ofa`` was written by pat_hf 0.1.0 (commit 195dd0e): a tiny transformers ConvNeXt teacher
saved with ``save_pretrained``, and ``checkpoint-4`` (the end of the first epoch) of an 8-step OFA run (timm resnet10t with 8-64 channels,
16 images of ``make_image_dataset(n=16, size=32)``, batch 4, constant learning rate 1e-3, seed 0), plus the
student's weights after all 8 steps of that same run (``final_student_old_code.safetensors``).
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import load_file

from pat_hf import ImageView, PATDistillationTrainer, create_student
from support.tiny import make_image_dataset, tiny_args

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_v0_1_ofa")


def legacy_v0_1_training_data(dataset, student_view: ImageView, teacher_view: ImageView):
    """``with_image_transforms(..., train=True)`` as pat_hf 0.1.0 had it: torchvision's random-resized crop
    (scale 0.08-1) and flip at the larger size, then each view's resize and normalisation."""
    from torchvision import transforms as T

    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}

    def to_view(view: ImageView):
        mode = modes.get(view.interpolation, T.InterpolationMode.BILINEAR)
        return T.Compose(
            [T.Resize(view.size, interpolation=mode, antialias=True), T.ToTensor(), T.Normalize(view.mean, view.std)]
        )

    base = tuple(max(a, b) for a, b in zip(student_view.size, teacher_view.size))
    augment = T.Compose([T.RandomResizedCrop(base, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip()])
    student_tf, teacher_tf = to_view(student_view), to_view(teacher_view)

    def apply(batch):
        images = [augment(image.convert("RGB")) for image in batch["image"]]
        return {
            "pixel_values": [student_tf(i) for i in images],
            "teacher_pixel_values": [teacher_tf(i) for i in images],
            "labels": list(batch["label"]),
        }

    return dataset.with_transform(apply)


def test_a_0_1_checkpoint_resumes_to_the_same_weights(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(os.path.join(LEGACY, "checkpoint-4"), run / "checkpoint-4")
    torch.manual_seed(0)
    student = create_student("resnet10t", num_classes=3, stem_width=8, channels=(8, 16, 32, 64))
    # The data must be drawn as 0.1.0 drew it (torchvision's crop and flip) for the reference weights to apply;
    # the library's augmentation is timm's since (other draws), so the test rebuilds 0.1.0's transform.
    train = legacy_v0_1_training_data(
        make_image_dataset(n=16, size=32), ImageView.from_timm(student), ImageView(size=(32, 32))
    )
    args = tiny_args(
        tmp_path,
        output_dir=str(run),
        distill_method="ofa",
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
    )
    trainer = PATDistillationTrainer(
        model=student, teacher=os.path.join(LEGACY, "teacher"), args=args, train_dataset=train
    )
    trainer.train(resume_from_checkpoint=True)

    assert trainer.state.global_step == 8
    expected = load_file(os.path.join(LEGACY, "final_student_old_code.safetensors"))
    got = trainer.student.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    # The new checkpoint is written in the same format: student, method state, manifest.
    assert {"model.safetensors", "distill_state.safetensors", "distill_manifest.json"} <= set(
        os.listdir(run / "checkpoint-8")
    )


LEGACY_V0_2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "legacy_v0_2_pat")


def legacy_v0_2_training_data():
    """The 16 pre-made float views (student and teacher, 32 px) of the 0.2.0 run: built without any
    augmentation, so the draws of the library's pipeline cannot change them."""
    import datasets

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(16) % 3
    student = torch.randn(16, 3, 32, 32, generator=generator) + labels.view(-1, 1, 1, 1).float()
    teacher = torch.randn(16, 3, 32, 32, generator=generator) + labels.view(-1, 1, 1, 1).float()
    data = {"pixel_values": student.numpy(), "teacher_pixel_values": teacher.numpy(), "labels": labels.numpy()}
    return datasets.Dataset.from_dict(data).with_format("torch")


def test_a_0_2_pat_checkpoint_resumes_to_the_same_weights(tmp_path):
    """``tests/data/legacy_v0_2_pat`` was written by pat_hf 0.2.0 (commit b750465, before the subpackages): the
    4-step checkpoint of an 8-step PAT run (the 0.1 teacher above; timm resnet10t 8-64 channels; PAT with
    dim 32, 16 queries, 2 heads; batch 4, constant learning rate 1e-3, seed 0) and the student after 8 steps.
    PAT carries the most state (prompts, RAA, aligners, feedback), all of it in the checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(os.path.join(LEGACY_V0_2, "checkpoint-4"), run / "checkpoint-4")
    torch.manual_seed(0)
    student = create_student("resnet10t", num_classes=3, stem_width=8, channels=(8, 16, 32, 64))
    args = tiny_args(
        tmp_path,
        output_dir=str(run),
        distill_method="pat",
        pat_dim=32,
        pat_num_queries=16,
        pat_num_heads=2,
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        per_device_train_batch_size=4,
        lr_scheduler_type="constant",
    )
    teacher = os.path.join(LEGACY, "teacher")
    trainer = PATDistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=legacy_v0_2_training_data()
    )
    trainer.train(resume_from_checkpoint=True)

    assert trainer.state.global_step == 8
    expected = load_file(os.path.join(LEGACY_V0_2, "final_student_v0_2.safetensors"))
    got = trainer.student.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
