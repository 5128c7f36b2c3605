"""Stage taps: the 4 stage features of every supported family, checked against the libraries' own features."""

from __future__ import annotations

import copy
import functools
import gc
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import timm
import torch
import transformers as tf
from torch import nn

from pat_hf.models.taps import (
    SUPPORTED_STUDENTS,
    SUPPORTED_TEACHERS,
    StageSpec,
    StageTaps,
    _group_ranges,
    build_taps,
    tokens_to_map,
)
from support.tiny import TEACHER_FAMILIES, tiny_teacher

# Last block (0-based) of each stage of an isotropic model: blocks 2, 4, 10, 12 (1-based) for 12 blocks.
ENDS_12 = [1, 3, 9, 11]
ENDS_2 = [0, 0, 1, 1]  # 2 blocks: neighbouring stages share a block


@dataclass
class Case:
    """A model to tap, how to read its own features, and where each stage's input enters it."""

    make: Callable[[], nn.Module]
    image_size: int
    family: str
    # The 4 stage features as the library itself exposes them, as maps (B, C, H, W) (+ prefix tokens or None).
    reference: Callable[[nn.Module, torch.Tensor], list[tuple[torch.Tensor, torch.Tensor | None]]]
    # The module whose input is stage k's input.
    entry: Callable[[nn.Module, int], nn.Module]
    cnn: bool = False
    # The 4 stage inputs as maps, from the library; None: stage k's input is stage k-1's output (k >= 1).
    input_reference: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]] | None = None


def _hf_tokens_reference(ends: list[int], prefix: int, grid: int):
    def reference(model, x):
        hidden = model(x, output_hidden_states=True).hidden_states  # [0] is the embedding output
        return [tokens_to_map(hidden[end + 1], prefix, grid, grid) for end in ends]

    return reference


def _hf_tokens_input_reference(ends: list[int], prefix: int, grid: int):
    def reference(model, x):
        hidden = model(x, output_hidden_states=True).hidden_states
        return [tokens_to_map(hidden[start], prefix, grid, grid)[0] for start in _starts(ends)]

    return reference


def _hf_swin_input_reference(natural: list[int]):
    def reference(model, x):
        # Without before_downsampling, entry i is what enters stage i: the stem, then each downsampled output.
        out = model.swin(x, output_hidden_states=True)
        return [out.reshaped_hidden_states[i] for i in natural]

    return reference


def _hf_maps_reference(natural: list[int]):
    def reference(model, x):
        hidden = model(x, output_hidden_states=True).hidden_states
        return [(hidden[i + 1], None) for i in natural]

    return reference


def _hf_swin_reference(natural: list[int]):
    def reference(model, x):
        out = model.swin(x, output_hidden_states=True, output_hidden_states_before_downsampling=True)
        return [(out.reshaped_hidden_states[i + 1], None) for i in natural]  # [0] is the stem

    return reference


def _timm_cnn_reference(indices: list[int], last_is_forward_features: bool = False):
    def reference(model, x):
        timm_model = getattr(model, "timm_model", model)
        maps = timm_model.forward_intermediates(x, indices=indices, intermediates_only=True)
        if last_is_forward_features:
            maps = [*maps, timm_model.forward_features(x)]
        return [(m, None) for m in maps]

    return reference


def _timm_tokens_reference(ends: list[int], prefix: bool = True):
    def reference(model, x):
        if not prefix:  # MlpMixer has no return_prefix_tokens argument
            return [(m, None) for m in model.forward_intermediates(x, indices=ends, intermediates_only=True)]
        out = model.forward_intermediates(x, indices=ends, intermediates_only=True, return_prefix_tokens=True)
        return [item if isinstance(item, tuple) else (item, None) for item in out]

    return reference


def _starts(ends: list[int]) -> list[int]:
    return [0 if k == 0 else min(ends[k - 1] + 1, ends[k]) for k in range(4)]


def _hf_vit12() -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return tf.ViTForImageClassification(cfg)


def _hf_deit_with_teacher() -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.DeiTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    return tf.DeiTForImageClassificationWithTeacher(cfg)


def _hf_swin4() -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.SwinConfig(
        image_size=32,
        patch_size=2,
        embed_dim=8,
        depths=[2, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
        num_labels=3,
    )
    return tf.SwinForImageClassification(cfg)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)

    return make


def _vit_entry(path: str, ends: list[int]):
    def entry(model, k):
        return model.get_submodule(path)[_starts(ends)[k]]

    return entry


CASES: dict[str, Case] = {
    # transformers teachers (support.tiny's configs: 2 layers, a 2-stage Swin)
    "hf_vit": Case(
        lambda: tiny_teacher("vit"),
        16,
        "hf_vit",
        _hf_tokens_reference(ENDS_2, 1, 4),
        _vit_entry("vit.layers", ENDS_2),
        input_reference=_hf_tokens_input_reference(ENDS_2, 1, 4),
    ),
    "hf_deit": Case(
        lambda: tiny_teacher("deit"),
        16,
        "hf_deit",
        _hf_tokens_reference(ENDS_2, 2, 4),
        _vit_entry("deit.layers", ENDS_2),
        input_reference=_hf_tokens_input_reference(ENDS_2, 2, 4),
    ),
    "hf_beit": Case(
        lambda: tiny_teacher("beit"),
        16,
        "hf_beit",
        _hf_tokens_reference(ENDS_2, 1, 4),
        _vit_entry("beit.layers", ENDS_2),
        input_reference=_hf_tokens_input_reference(ENDS_2, 1, 4),
    ),
    "hf_swin": Case(
        lambda: tiny_teacher("swin"),
        16,
        "hf_swin",
        _hf_swin_reference([0, 0, 1, 1]),
        lambda m, k: m.swin.encoder.layers[[0, 0, 1, 1][k]],
        input_reference=_hf_swin_input_reference([0, 0, 1, 1]),
    ),
    "hf_convnext": Case(
        lambda: tiny_teacher("convnext"),
        32,
        "hf_convnext",
        _hf_maps_reference([0, 1, 2, 3]),
        lambda m, k: m.convnext.encoder.stages[k],
        cnn=True,
    ),
    "hf_resnet": Case(
        lambda: tiny_teacher("resnet"),
        32,
        "hf_resnet",
        _hf_maps_reference([0, 1, 2, 3]),
        lambda m, k: m.resnet.encoder.stages[k],
        cnn=True,
    ),
    "hf_timm_wrapper": Case(
        lambda: tiny_teacher("timm_wrapper"),
        32,
        "hf_timm_wrapper:timm_resnet",
        _timm_cnn_reference([1, 2, 3, 4]),
        lambda m, k: getattr(m.timm_model, f"layer{k + 1}")[0],
        cnn=True,
    ),
    "hf_vit12": Case(
        _hf_vit12,
        16,
        "hf_vit",
        _hf_tokens_reference(ENDS_12, 1, 4),
        _vit_entry("vit.layers", ENDS_12),
        input_reference=_hf_tokens_input_reference(ENDS_12, 1, 4),
    ),
    "hf_deit_with_teacher": Case(
        _hf_deit_with_teacher,
        16,
        "hf_deit",
        _hf_tokens_reference(ENDS_2, 2, 4),
        _vit_entry("deit.layers", ENDS_2),
        input_reference=_hf_tokens_input_reference(ENDS_2, 2, 4),
    ),
    "hf_swin4": Case(
        _hf_swin4,
        32,
        "hf_swin",
        _hf_swin_reference([0, 1, 2, 3]),
        lambda m, k: m.swin.encoder.layers[k],
        input_reference=_hf_swin_input_reference([0, 1, 2, 3]),
    ),
    # timm students
    "timm_test_resnet": Case(
        _timm("test_resnet"),
        32,
        "timm_resnet",
        _timm_cnn_reference([1, 2, 3, 4]),
        lambda m, k: getattr(m, f"layer{k + 1}")[0],
        cnn=True,
    ),
    "timm_resnet18": Case(
        _timm("resnet18"),
        32,
        "timm_resnet",
        _timm_cnn_reference([1, 2, 3, 4]),
        lambda m, k: getattr(m, f"layer{k + 1}")[0],
        cnn=True,
    ),
    "timm_mobilenetv2_100": Case(
        _timm("mobilenetv2_100"),
        32,
        "timm_mobilenetv2",
        _timm_cnn_reference([1, 2, 3], last_is_forward_features=True),  # stage 4: the 1280-channel conv head
        lambda m, k: m.blocks[[0, 2, 3, 5][k]][0],
        cnn=True,
    ),
    "timm_mobilenetv3_small_100": Case(
        _timm("mobilenetv3_small_100"),
        32,
        "timm_mobilenetv3",
        _timm_cnn_reference([1, 2, 3, 4]),
        lambda m, k: m.blocks[[0, 1, 2, 4][k]][0],
        cnn=True,
    ),
    "timm_efficientnet_b0": Case(
        _timm("efficientnet_b0"),
        32,
        "timm_efficientnet",
        _timm_cnn_reference([1, 2, 3, 4]),
        lambda m, k: m.blocks[[0, 2, 3, 5][k]][0],
        cnn=True,
    ),
    "timm_test_convnext": Case(
        _timm("test_convnext"),
        32,
        "timm_convnext",
        _timm_cnn_reference([0, 1, 2, 3]),
        lambda m, k: m.stages[k],
        cnn=True,
    ),
    "timm_test_vit": Case(  # 6 blocks: stages end after blocks 1, 2, 5, 6
        _timm("test_vit", img_size=64),
        64,
        "timm_vit",
        _timm_tokens_reference([0, 1, 4, 5]),
        _vit_entry("blocks", [0, 1, 4, 5]),
    ),
    "timm_deit_tiny_distilled": Case(
        _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=48, num_heads=2),
        32,
        "timm_vit",
        _timm_tokens_reference(ENDS_12),
        _vit_entry("blocks", ENDS_12),
    ),
    "timm_swin_tiny": Case(
        _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=2, embed_dim=16, num_heads=(1, 2, 4, 8)),
        32,
        "timm_swin",
        _timm_cnn_reference([0, 1, 2, 3]),
        lambda m, k: m.layers[k],
    ),
    "timm_mixer_s32": Case(  # 8 blocks: stages end after blocks 1, 3, 7, 8
        _timm("mixer_s32_224", img_size=64),
        64,
        "timm_mixer",
        _timm_tokens_reference([0, 2, 6, 7], prefix=False),
        _vit_entry("blocks", [0, 2, 6, 7]),
    ),
    "timm_resmlp_12": Case(
        _timm("resmlp_12_224", img_size=64),
        64,
        "timm_resmlp",
        _timm_tokens_reference(ENDS_12, prefix=False),
        _vit_entry("blocks", ENDS_12),
    ),
}

assert {f"hf_{f}" for f in TEACHER_FAMILIES} <= CASES.keys()


def _randomize_zero_parameters(model: nn.Module) -> nn.Module:
    """Libraries zero-initialise heads, cls / distillation tokens and position embeddings: a zero head hides any
    change of the features, and a zero cls token cannot show that prefix tokens pass through untouched."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and not parameter.any():
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def _fresh(name: str) -> nn.Module:
    return _randomize_zero_parameters(CASES[name].make()).eval()


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These models are tiny: on a shared 2-core machine, intra-op threads mostly wait for each other (30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stem(model: nn.Module) -> nn.Parameter:
    """The first conv / patch-embedding weight."""
    return next(p for p in model.parameters() if p.dim() == 4)


@functools.cache
def _model(name: str) -> nn.Module:
    model = _fresh(name)
    # Only the stem needs a gradient (to see gradients reach the model); the rest would only cost backward time.
    model.requires_grad_(False)
    _stem(model).requires_grad_(True)
    return model


@functools.cache
def _tapped(name: str) -> StageTaps:
    return build_taps(_model(name), CASES[name].image_size)


@pytest.fixture(params=sorted(CASES))
def tapped(request) -> tuple[str, nn.Module, StageTaps, torch.Tensor]:
    """A cached model with cached taps (probing every model once keeps the file fast); reset after each test."""
    name = request.param
    model, taps = _model(name), _tapped(name)
    torch.manual_seed(1)
    x = torch.randn(2, 3, CASES[name].image_size, CASES[name].image_size)
    yield name, model, taps, x
    taps.set_input_transforms(None)
    model.zero_grad(set_to_none=True)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _as_map(feature: torch.Tensor, spec: StageSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec.kind == "map":
        return feature, None
    feature_map, prefix = tokens_to_map(feature, spec.prefix_tokens, spec.height, spec.width)
    return feature_map, prefix if spec.prefix_tokens else None


def test_stage_features_match_specs_and_library_features(tapped):
    name, model, taps, x = tapped
    assert taps.family == CASES[name].family
    assert len(taps.output_specs) == len(taps.input_specs) == 4
    assert all(spec.kind == "map" for spec in taps.input_specs)
    with torch.no_grad():
        reference = CASES[name].reference(model, x)
        with taps.capture() as feats:
            model(x)
    assert len(feats) == len(reference) == 4
    for stage, (feature, spec, (ref_map, ref_prefix)) in enumerate(zip(feats, taps.output_specs, reference)):
        assert tuple(feature.shape) == spec.shape(2), f"stage {stage}"
        feature_map, prefix = _as_map(feature, spec)
        torch.testing.assert_close(feature_map, ref_map, msg=f"stage {stage}")
        if ref_prefix is not None:
            torch.testing.assert_close(prefix, ref_prefix, msg=f"stage {stage} prefix")
    grids = [spec.height for spec in taps.output_specs]
    assert grids == sorted(grids, reverse=True)  # the grid never grows with depth
    if CASES[name].cnn:
        assert grids == [x.shape[-1] // r for r in (4, 8, 16, 32)]
        channels = [spec.channels for spec in taps.output_specs]
        if name in ("timm_test_resnet", "hf_timm_wrapper"):
            # timm's test_resnet has 32, 48, 192, 96 channels by design: check the widths timm reports instead.
            timm_model = getattr(model, "timm_model", model)
            assert channels == [info["num_chs"] for info in timm_model.feature_info[1:]]
        else:
            assert channels == sorted(channels)


@pytest.mark.parametrize(
    "name", ["timm_test_resnet", "timm_resnet18", "timm_test_convnext", "timm_mobilenetv3_small_100"]
)
def test_last_stage_is_forward_features(name):
    model, taps = _model(name), _tapped(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), taps.capture() as feats:
        model(x)
        expected = model.forward_features(x)
    torch.testing.assert_close(feats[3], expected, rtol=0, atol=0)


def test_transforms_see_the_stage_input_as_a_map(tapped):
    name, model, taps, x = tapped
    seen: dict[int, torch.Tensor] = {}

    def recorder(stage):
        def record(feature_map):
            seen[stage] = feature_map.clone()
            return feature_map

        return record

    taps.set_input_transforms({stage: recorder(stage) for stage in range(4)})
    with torch.no_grad(), taps.capture() as feats:
        model(x)
    for stage in range(4):
        assert tuple(seen[stage].shape) == taps.input_specs[stage].shape(2)
    if CASES[name].input_reference is not None:
        with torch.no_grad():
            expected = CASES[name].input_reference(model, x)
        for stage in range(4):
            torch.testing.assert_close(seen[stage], expected[stage], msg=f"stage {stage}")
    else:
        for stage in range(1, 4):
            previous, _ = _as_map(feats[stage - 1], taps.output_specs[stage - 1])
            torch.testing.assert_close(seen[stage], previous, rtol=0, atol=0, msg=f"stage {stage}")


def test_capture_keeps_autograd(tapped):
    _, model, taps, x = tapped
    with taps.capture() as feats:
        model(x)
    assert all(feature.requires_grad for feature in feats)
    loss = sum(feature.float().pow(2).mean() for feature in feats)
    loss.backward()
    stem = _stem(model)
    assert stem.grad is not None and stem.grad.abs().sum() > 0


def test_identity_transforms_are_bit_identical(tapped):
    _, model, taps, x = tapped
    with torch.no_grad():
        plain = _logits(model, x)
        taps.set_input_transforms({0: lambda m: m, 1: lambda m: m.clone(), 2: lambda m: m * 1, 3: lambda m: m + 0})
        prompted = _logits(model, x)
        taps.set_input_transforms(None)
        again = _logits(model, x)
    assert torch.equal(plain, prompted)
    assert torch.equal(plain, again)


def test_offset_transform_changes_logits_and_trains(tapped):
    _, model, taps, x = tapped
    with torch.no_grad():
        plain = _logits(model, x)
    for stage in (0, 3):
        spec = taps.input_specs[stage]
        # A non-uniform offset: a constant one would vanish in the LayerNorms of token models.
        offset = torch.randn(1, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(2))
        scale = nn.Parameter(torch.tensor(1.0))
        seen = []

        def transform(feature_map, offset=offset, scale=scale, seen=seen):
            seen.append(feature_map.shape)
            return feature_map + scale * offset

        taps.set_input_transforms({stage: transform})
        prompted = _logits(model, x)
        assert seen == [torch.Size(spec.shape(2))], f"stage {stage}"
        assert not torch.allclose(plain, prompted), f"stage {stage}"
        prompted.square().sum().backward()
        assert scale.grad is not None and scale.grad.abs() > 0, f"stage {stage}"


def test_zeroing_transform_spares_prefix_tokens(tapped):
    name, model, taps, x = tapped
    before: dict[int, list[torch.Tensor]] = {k: [] for k in range(4)}
    after: dict[int, list[torch.Tensor]] = {k: [] for k in range(4)}

    def recorder(store):
        def record(module, args, kwargs):
            store.append(args[0] if args else kwargs["hidden_states"])

        return record

    handles = []
    for stage in range(4):
        entry = CASES[name].entry(model, stage)
        # One hook before the taps' hook and one after: the block's input as given, and as the block receives it.
        handles.append(entry.register_forward_pre_hook(recorder(before[stage]), with_kwargs=True, prepend=True))
        handles.append(entry.register_forward_pre_hook(recorder(after[stage]), with_kwargs=True))
    taps.set_input_transforms(dict.fromkeys(range(4), torch.zeros_like))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    for stage in range(4):
        prefix = taps.output_specs[stage].prefix_tokens
        given, received = before[stage][0], after[stage][0]
        assert given.shape == received.shape
        if prefix:
            assert torch.equal(received[:, :prefix], given[:, :prefix]), f"stage {stage}"
            assert given[:, :prefix].any()
        assert not (received[:, prefix:] if prefix else received).any(), f"stage {stage}"


def test_capture_scope_and_references():
    model = _model("timm_test_resnet")
    taps = build_taps(model, 32)
    x = torch.randn(2, 3, 32, 32)
    try:
        with torch.no_grad():
            with taps.capture() as outer:
                assert outer == []
                with taps.capture() as inner:
                    model(x)
                assert len(inner) == 4 and outer == []  # nested blocks capture into the innermost list
                model(x)
                assert len(outer) == 4
            model(x)  # outside any block: nothing recorded anywhere
        assert not taps._sinks
        ref = weakref.ref(outer[0])
        del inner, outer
        gc.collect()
        assert ref() is None  # the taps keep no reference once the block is over
    finally:
        taps.remove()


def test_second_forward_overwrites_capture():
    model = _model("timm_test_resnet")
    taps = build_taps(model, 32)
    try:
        with torch.no_grad(), taps.capture() as feats:
            model(torch.zeros(1, 3, 32, 32))
            first = list(feats)
            model(torch.ones(3, 3, 32, 32))
        assert len(feats) == 4 and feats[0].shape[0] == 3 and first[0].shape[0] == 1
    finally:
        taps.remove()


def test_remove_leaves_model_untapped():
    model = _model("hf_vit")

    def hook_count():
        return sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
            for m in model.modules()
        )

    before = hook_count()
    taps = build_taps(model, 16)
    assert hook_count() > before
    taps.set_input_transforms({0: torch.zeros_like})
    taps.remove()
    assert hook_count() == before
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), taps.capture() as feats:
        model(x)
    assert feats == []
    taps.remove()  # idempotent


def test_deepcopy_of_tapped_model_is_untapped():
    model = _model("timm_test_resnet")
    taps = build_taps(model, 32)
    x = torch.randn(2, 3, 32, 32)
    try:
        copied = copy.deepcopy(model)  # e.g. an EMA copy of a student
        taps.set_input_transforms({0: torch.zeros_like})
        with torch.no_grad(), taps.capture() as feats:
            copied_logits = copied(x)
            assert feats == []
            taps.set_input_transforms(None)
            torch.testing.assert_close(copied_logits, model(x), rtol=0, atol=0)
    finally:
        taps.remove()


def test_probe_restores_training_mode_and_batch_statistics():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).train()
    model.layer1[0].eval()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    taps = build_taps(model, 32)
    taps.remove()
    assert {n: m.training for n, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, stats[key]), key


@pytest.mark.parametrize("name", ["timm_test_resnet", "timm_efficientnet_b0", "timm_test_vit"])
def test_gradient_checkpointing_still_tapped(name):
    # timm's checkpoint_seq(flatten=True) calls the blocks of ResNet / EfficientNet directly, not their groups.
    model = CASES[name].make().eval()
    taps = build_taps(model, CASES[name].image_size)
    x = torch.randn(2, 3, CASES[name].image_size, CASES[name].image_size)
    try:
        with torch.no_grad(), taps.capture() as plain:
            model(x)
        model.set_grad_checkpointing(True)
        with taps.capture() as checkpointed:
            model(x)
        assert len(checkpointed) == 4
        for a, b in zip(plain, checkpointed):
            torch.testing.assert_close(a, b)
    finally:
        taps.remove()


def test_hf_vit_other_resolution_and_keyword_input():
    model = _model("hf_vit")
    taps = build_taps(model)  # default: config.image_size
    assert taps.output_specs[0] == StageSpec("tokens", 32, 4, 4, 1)
    shapes = []
    taps.set_input_transforms({0: lambda m: shapes.append(m.shape) or m})
    try:
        with torch.no_grad(), taps.capture() as feats:
            model(torch.randn(2, 3, 24, 24), interpolate_pos_encoding=True)
            assert feats[3].shape == (2, 1 + 36, 32)
            assert shapes == [(2, 32, 6, 6)]
            tokens = torch.randn(2, 17, 32)
            model.vit.layers[0](hidden_states=tokens)  # the stage input passed by keyword is transformed too
        assert shapes[-1] == (2, 32, 4, 4)
    finally:
        taps.remove()


def test_transform_errors():
    model = _model("hf_resnet")
    taps = build_taps(model, 32)
    try:
        with pytest.raises(ValueError, match="stage indices"):
            taps.set_input_transforms({4: torch.zeros_like})
        with pytest.raises(ValueError, match="not callable"):
            taps.set_input_transforms({0: 1.0})
        taps.set_input_transforms({1: lambda m: m[:, :1]})
        with pytest.raises(ValueError, match="stage 1"), torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        taps.set_input_transforms(None)
        assert taps.input_transforms == {}
    finally:
        taps.remove()


def test_model_without_stages_is_refused_naming_it_and_the_logit_methods():
    """A model with neither timm's feature_info nor transformers' hidden states has no stage to read: refused with
    a message that names the model and the methods that work with it, never internal family ids, and no hook
    left behind."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="Sequential") as info:
        build_taps(model, 32)
    message = str(info.value)
    assert "kd, dkd, dist" in message
    for family in (*SUPPORTED_TEACHERS, *SUPPORTED_STUDENTS):
        assert family not in message
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_timm_model_outside_the_family_rules_gets_generic_stages():
    """test_byobnet (no family rule): the last feature_info module per reduction, the deepest 4."""
    model = timm.create_model("test_byobnet", pretrained=False)
    taps = build_taps(model, 64)
    try:
        assert taps.family == "timm_generic"
        by_reduction = {}
        for info in model.feature_info:
            by_reduction[info["reduction"]] = (info["num_chs"], info["module"])
        expected = [by_reduction[r] for r in sorted(by_reduction)[-4:]]
        assert [(s.channels, s.height) for s in taps.output_specs] == [
            (channels, 64 // r) for r, (channels, _) in zip(sorted(by_reduction)[-4:], expected)
        ]
        assert all(s.kind == "map" for s in taps.output_specs)
    finally:
        taps.remove()


@pytest.mark.parametrize(
    ("units", "ends", "expected"),
    [
        (12, "iso", [(0, 2), (2, 4), (4, 10), (10, 12)]),
        (24, "iso", [(0, 4), (4, 8), (8, 20), (20, 24)]),
        (6, "iso", [(0, 1), (1, 2), (2, 5), (5, 6)]),
        (4, "iso", [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (2, "iso", [(0, 1), (0, 1), (1, 2), (1, 2)]),
        (1, "iso", [(0, 1)] * 4),
        (4, "hier", [(0, 1), (1, 2), (2, 3), (3, 4)]),
        (2, "hier", [(0, 1), (0, 1), (1, 2), (1, 2)]),
    ],
)
def test_group_ranges(units, ends, expected):
    fractions = (2 / 12, 4 / 12, 10 / 12, 1.0) if ends == "iso" else (0.25, 0.5, 0.75, 1.0)
    assert _group_ranges(units, fractions) == expected
