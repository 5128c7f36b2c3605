"""Tiny models built from configs and tiny in-memory image datasets (no network), shared by the tests and by
the worker scripts they launch."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from PIL import Image

from pat_hf import PATTrainingArguments

__all__ = ["CLASS_NAMES", "TEACHER_FAMILIES", "make_image_dataset", "tiny_args", "tiny_teacher"]

CLASS_NAMES = ["cat", "dog", "bird"]


def make_image_dataset(
    n: int = 24, size: int = 20, mode: str = "RGB", seed: int = 0, names=CLASS_NAMES
) -> datasets.Dataset:
    """Random images whose mean brightness depends on the label, so a model can learn something."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    for i in range(n):
        label = i % len(names)
        base = 40 + 80 * label
        arr = np.clip(rng.normal(base, 30, (size, size, channels)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode))
        labels.append(label)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def tiny_teacher(family: str, num_labels: int = 3, id2label: dict | None = None):
    """A randomly initialised transformers image classifier of the given family."""
    import transformers as tf

    label_kwargs = {"num_labels": num_labels}
    if id2label is not None:
        label_kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
    torch.manual_seed(0)
    if family == "vit":
        cfg = tf.ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **label_kwargs,
        )
        return tf.ViTForImageClassification(cfg)
    if family == "deit":
        cfg = tf.DeiTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **label_kwargs,
        )
        return tf.DeiTForImageClassification(cfg)
    if family == "beit":
        cfg = tf.BeitConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            use_mean_pooling=True,
            **label_kwargs,
        )
        return tf.BeitForImageClassification(cfg)
    if family == "swin":
        cfg = tf.SwinConfig(
            image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2, **label_kwargs
        )
        return tf.SwinForImageClassification(cfg)
    if family == "convnext":
        cfg = tf.ConvNextConfig(image_size=32, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], **label_kwargs)
        return tf.ConvNextForImageClassification(cfg)
    if family == "resnet":
        cfg = tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic", **label_kwargs
        )
        return tf.ResNetForImageClassification(cfg)
    if family == "timm_wrapper":
        cfg = tf.TimmWrapperConfig(architecture="test_resnet", **label_kwargs)
        return tf.TimmWrapperForImageClassification(cfg)
    raise ValueError(family)


TEACHER_FAMILIES = ["vit", "deit", "beit", "swin", "convnext", "resnet", "timm_wrapper"]


def tiny_args(tmp_path, **overrides) -> PATTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    defaults.update(overrides)
    return PATTrainingArguments(**defaults)
