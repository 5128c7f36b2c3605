"""The penultimate-embedding tap (pat_hf.models.taps.embedding): the classifier's input of timm and transformers models."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import transformers as tf

from pat_hf.models.taps import build_embedding_tap, find_classifier
from support.tiny import TEACHER_FAMILIES, tiny_teacher

TIMM_MODELS = {
    "test_resnet": ({}, 32),
    "test_vit": ({}, 32),
    "test_convnext": ({}, 32),
    "test_efficientnet": ({}, 32),
    "mobilenetv2_035": ({}, 32),
    "resmlp_12_224": ({"img_size": 32}, 32),
    "swin_tiny_patch4_window7_224": (
        {"img_size": 56, "depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": (1, 1, 1, 1)},
        56,
    ),
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_tap_equals_forward_head_pre_logits(name):
    kwargs, size = TIMM_MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    tap = build_embedding_tap(model, image_size=size)
    assert tap.name and model.get_submodule(tap.name) is model.get_classifier()
    assert tap.dim == model.num_features or tap.dim == model.head_hidden_size
    x = torch.randn(3, 3, size, size)
    with tap.capture() as sink, torch.no_grad():
        logits = model(x)
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
    assert len(sink) == 1 and sink[0].shape == (3, tap.dim)
    torch.testing.assert_close(sink[0], reference.flatten(1), rtol=0, atol=0)
    # The classifier maps exactly this embedding to the logits.
    torch.testing.assert_close(model.get_classifier()(sink[0]), logits)


@pytest.mark.parametrize("family", TEACHER_FAMILIES)
def test_transformers_tap_feeds_the_logits(family):
    model = tiny_teacher(family).eval()
    tap = build_embedding_tap(model)
    classifier = model.get_submodule(tap.name)
    assert isinstance(classifier, torch.nn.Linear) and tap.dim == classifier.in_features
    size = getattr(model.config, "image_size", 32) if family != "timm_wrapper" else 32
    x = torch.randn(2, 3, size, size)
    with tap.capture() as sink, torch.no_grad():
        logits = model(pixel_values=x).logits
    assert sink[0].shape == (2, tap.dim)
    torch.testing.assert_close(classifier(sink[0]), logits)


def test_hf_vit_tap_is_the_normalised_cls_token():
    """Against the model's own hidden states: the final LayerNorm of the last layer's cls token."""
    model = tiny_teacher("vit").eval()
    tap = build_embedding_tap(model)
    x = torch.randn(2, 3, 16, 16)
    with tap.capture() as sink, torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    expected = model.vit.layernorm(out.hidden_states[-1])[:, 0]
    torch.testing.assert_close(sink[0], expected)


def test_probe_finds_the_classifier_without_get_classifier():
    """TimmWrapper has no get_classifier(): the probe finds the wrapped timm model's own head."""
    model = tiny_teacher("timm_wrapper")
    name, module = find_classifier(model, (32, 32))
    assert name == "timm_model." + next(n for n, m in model.timm_model.named_modules() if m is module)
    assert module is model.timm_model.get_classifier()


def test_tap_keeps_gradients_and_training_flags():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3).train()
    flags = {n: m.training for n, m in model.named_modules()}
    tap = build_embedding_tap(model)
    assert {n: m.training for n, m in model.named_modules()} == flags  # the probe restored train mode
    with tap.capture() as sink:
        model(torch.randn(2, 3, 32, 32)).sum()
    assert sink[0].requires_grad
    grad = torch.autograd.grad(sink[0].square().sum(), model.patch_embed.proj.weight)[0]
    assert grad.abs().sum() > 0


def test_nothing_is_captured_outside_a_block_and_copies_are_untapped():
    model = timm.create_model("test_resnet", num_classes=3).eval()
    tap = build_embedding_tap(model)
    x = torch.randn(2, 3, 32, 32)
    with tap.capture() as sink:
        pass
    model(x)
    assert sink == []
    twin = copy.deepcopy(model)  # an EMA copy: its forward must not write into the original's tap
    with tap.capture() as sink, torch.no_grad():
        twin(x)
        assert sink == []
        model(x)
        assert len(sink) == 1
    tap.remove()
    with tap.capture() as sink:
        model(x)
    assert sink == []


def test_a_model_averaging_two_heads_is_refused():
    cfg = tf.DeiTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = tf.DeiTForImageClassificationWithTeacher(cfg)
    with pytest.raises(ValueError, match="no module produces the logits"):
        build_embedding_tap(model)
