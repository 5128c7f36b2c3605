"""OFA-KD: branch heads per student family, the loss against hand-computed values, training end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.methods import DistillationBatch, OFADistillation, get_method
from pat_hf.methods.ofa import ConvBranchHead, PatchMerging, TokenBranchHead, build_branch_head, teacher_feature_dim
from pat_hf.models.taps import StageSpec, map_to_tokens
from pat_hf.models.teacher import load_teacher
from support.tiny import make_image_dataset, tiny_args, tiny_teacher

# Students small enough for CPU tests; the kwargs go to timm.create_model.
STUDENTS = {
    "test_resnet": {"img_size": 20},
    "mobilenetv2_100": {"img_size": 32},
    "test_vit": {"img_size": 16},
    "deit_tiny_distilled_patch16_224": {"img_size": 32, "embed_dim": 32, "depth": 4, "num_heads": 2},
    "test_convnext": {"img_size": 32},
}


def small_student(name: str) -> torch.nn.Module:
    """A student of the family ``name`` with 3 classes; Mixer and ResMLP narrowed through their classes (their timm
    registrations fix the width)."""
    from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock

    if name == "small_mixer":
        return MlpMixer(num_classes=3, img_size=32, patch_size=8, num_blocks=4, embed_dim=32)
    if name == "small_resmlp":
        return MlpMixer(
            num_classes=3,
            img_size=32,
            patch_size=8,
            num_blocks=4,
            embed_dim=32,
            mlp_ratio=4,
            block_layer=ResBlock,
            norm_layer=Affine,
        )
    return create_student(name, num_classes=3, **STUDENTS[name])


# The method computes in float32, the hand-written losses in float64.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def small_processor(size: int = 24):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.4] * 3, image_std=[0.3] * 3)


def hand_ofa(student_logits, teacher_logits, labels, eps, temperature=1.0):
    """The OFA loss written out: mean_b Σ_c −[(p_t + m)^ε − m]·log p_s."""
    p_t = torch.softmax(teacher_logits.double() / temperature, -1)
    log_p_s = torch.log(torch.softmax(student_logits.double() / temperature, -1))
    m = torch.zeros_like(p_t) if labels is None else F.one_hot(labels, p_t.shape[-1]).double()
    return (-(((p_t + m) ** eps - m) * log_p_s).sum(-1)).mean()


def make_method(tmp_path, student, teacher_family="vit", **overrides) -> OFADistillation:
    args = tiny_args(tmp_path, distill_method="ofa", **overrides)
    return OFADistillation(args, student, load_teacher(tiny_teacher(teacher_family)))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- heads on synthetic stage layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_conv_head_downsamples_4_minus_s_times_to_the_width(stage):
    spec = StageSpec("map", 8 * 2 ** (stage - 1), 32 // 2**stage, 32 // 2**stage)
    head = build_branch_head(spec, stage, width=48, num_classes=5, convolutional=True)
    assert isinstance(head, ConvBranchHead)
    convs = [m for m in head.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    if stage < 4:
        # Two dw + pw pairs per block; pointwise outputs double, the last one ends at the width.
        pointwise = [c.out_channels for c in convs if c.groups == 1]
        expected = []
        for i in range(4 - stage):
            block_in = spec.channels * 2**i
            expected += [block_in, 48 if i == 4 - stage - 1 else 2 * block_in]
        assert pointwise == expected
        assert sum(c.stride == (2, 2) for c in convs) == 4 - stage
    else:
        assert [(c.kernel_size, c.out_channels) for c in convs] == [((1, 1), 48)]
    x = torch.randn(2, *spec.shape(2)[1:])
    assert head(x).shape == (2, 5)


def test_patch_merging_halves_odd_grids_and_keeps_neighbourhoods():
    merge = PatchMerging(2, 3)
    x = torch.randn(1, 5, 5, 2)
    assert merge(x).shape == (1, 3, 3, 3)
    # The first output token is made of the top-left 2x2 neighbourhood only.
    y = x.clone()
    y[:, 2:, :] = 0
    y[:, :, 2:] = 0
    torch.testing.assert_close(merge(x)[0, 0, 0], merge(y)[0, 0, 0])


@pytest.mark.parametrize(
    "spec,stage,merges",
    [
        (StageSpec("tokens", 24, 14, 14, prefix_tokens=1), 1, 1),  # ViT-like grid 14 -> 7
        (StageSpec("tokens", 24, 14, 14, prefix_tokens=2), 2, 1),  # DeiT distilled: cls + dist tokens
        (StageSpec("tokens", 24, 4, 4, prefix_tokens=0), 3, 0),  # Mixer: small grid, no merging
        (StageSpec("map", 16, 28, 28), 1, 2),  # Swin stage map: 28 -> 14 -> 7
        (StageSpec("map", 16, 27, 27), 2, 2),  # odd grid: padded, 27 -> 14 -> 7
        (StageSpec("map", 64, 7, 7), 4, 0),
    ],
)
def test_token_head_merges_towards_7x7_and_classifies(spec, stage, merges):
    head = build_branch_head(spec, stage, width=30, num_classes=5, convolutional=False)
    assert isinstance(head, TokenBranchHead)
    assert len(head.mergers) == merges
    assert len(head.blocks) == max(4 - stage, 1)
    assert head.norm.normalized_shape == (32,)  # 30 rounded up to a multiple of the 4 attention heads
    x = torch.randn(*spec.shape(3))
    assert head(x).shape == (3, 5)


def test_token_head_reads_the_first_prefix_token():
    """cls first (timm and HF): with two prefix tokens only the first is read out, after the blocks."""
    spec = StageSpec("tokens", 8, 2, 2, prefix_tokens=2)
    head = build_branch_head(spec, 4, width=8, num_classes=3, convolutional=False).eval()
    head.blocks = torch.nn.Identity()  # without mixing, the readout sees its own token only
    x = torch.randn(2, 6, 8)
    y = x.clone()
    y[:, 1:] = torch.randn(2, 5, 8)
    torch.testing.assert_close(head(x), head(y))
    y[:, 0] = torch.randn(2, 8)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(head(x), head(y))


def test_token_head_accepts_tokens_in_canonical_order():
    """Tokens (B, P + H·W, C) and the same grid as a map give the same logits (no prefix tokens)."""
    spec_map = StageSpec("map", 8, 4, 4)
    spec_tok = StageSpec("tokens", 8, 4, 4)
    torch.manual_seed(0)
    head_map = build_branch_head(spec_map, 3, width=8, num_classes=3, convolutional=False).eval()
    head_tok = build_branch_head(spec_tok, 3, width=8, num_classes=3, convolutional=False).eval()
    head_tok.load_state_dict(head_map.state_dict())
    grid = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(head_tok(map_to_tokens(grid)), head_map(grid))


def test_teacher_feature_dim_from_configs():
    assert teacher_feature_dim(tiny_teacher("vit")) == 32
    assert teacher_feature_dim(tiny_teacher("swin")) == 32  # last stage: 16 * 2
    assert teacher_feature_dim(tiny_teacher("convnext")) == 64
    assert teacher_feature_dim(tiny_teacher("resnet")) == 64
    assert teacher_feature_dim(tiny_teacher("timm_wrapper")) == 96
    assert teacher_feature_dim(torch.nn.Linear(2, 2)) is None


# ---- heads on real students ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,size",
    [
        ("test_resnet", 20),
        ("mobilenetv2_100", 32),
        ("test_vit", 16),
        ("deit_tiny_distilled_patch16_224", 32),
        ("small_mixer", 32),
        ("small_resmlp", 32),
    ],
)
def test_heads_give_logits_for_each_student_family(tmp_path, name, size):
    student = small_student(name)
    method = make_method(tmp_path, student, "convnext")
    convolutional = name in ("test_resnet", "mobilenetv2_100")
    head_type = ConvBranchHead if convolutional else TokenBranchHead
    assert set(method.heads) == {"s1", "s2", "s3", "s4"}
    assert all(isinstance(h, head_type) for h in method.heads.values())
    # d_t = 64 (ConvNeXt's last stage); d_s = the student's last stage; token heads keep the student's width.
    expected = max(method.specs[-1].channels, 64) if convolutional else method.specs[-1].channels
    assert method.head_width == expected
    student.train()
    with method._taps.capture() as features:
        logits = student(torch.randn(2, 3, size, size))
    logits = logits[0] if isinstance(logits, tuple) else logits
    assert logits.shape == (2, 3)
    for stage in (1, 2, 3, 4):
        assert method.heads[f"s{stage}"](features[stage - 1]).shape == (2, 3)


def test_deit_heads_carry_both_prefix_tokens(tmp_path):
    student = small_student("deit_tiny_distilled_patch16_224")
    method = make_method(tmp_path, student, "vit")
    assert all(h.prefix_tokens == 2 for h in method.heads.values())


def test_head_parameter_counts(tmp_path):
    """Recorded sizes: they change only when the head structure does."""
    student = create_student("test_resnet", num_classes=3, img_size=20)
    method = make_method(tmp_path, student, "vit")
    assert method.head_parameters() == count(method.heads) == sum(p.numel() for p in method.parameters())
    # ResNet18 at 224 (stages 64/128/256/512 at 56/28/14/7), 100 classes, a 768-wide teacher.
    specs = [StageSpec("map", 64 * 2**i, 56 // 2**i, 56 // 2**i) for i in range(4)]
    heads = [build_branch_head(spec, s, 768, 100, True) for s, spec in enumerate(specs, 1)]
    assert [count(h) for h in heads] == [411748, 397924, 345700, 471652]


def test_single_stage_builds_one_head(tmp_path):
    student = create_student("test_resnet", num_classes=3, img_size=20)
    method = make_method(tmp_path, student, ofa_stages=[4], ofa_epsilon=[1.0, 2.0])
    assert list(method.heads) == ["s4"]
    assert method.epsilon == [1.0, 2.0]


# ---- the loss ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labelled", [True, False])
def test_loss_applies_epsilon_per_stage(tmp_path, labelled):
    torch.manual_seed(0)
    student = create_student("test_resnet", num_classes=3, img_size=20)
    eps = [1.0, 1.5, 2.0, 2.5, 3.0]
    method = make_method(
        tmp_path, student, ofa_epsilon=eps, ofa_weight=0.3, ce_weight=0.7, kd_weight=0.4, label_smoothing=0.1
    ).eval()  # eval: the heads' BN uses running statistics, so calling a head twice gives the same logits
    features = {s: torch.randn(*spec.shape(4)) for s, spec in enumerate(method.specs, 1)}
    logits, teacher_logits = torch.randn(4, 3), torch.randn(4, 3) * 3
    labels = torch.tensor([0, 2, 1, 2]) if labelled else None
    out = method.compute_loss(logits, features, teacher_logits, labels)

    expected = 0.4 * hand_ofa(logits, teacher_logits, labels, 3.0)
    torch.testing.assert_close(out.parts["ofa"].double(), hand_ofa(logits, teacher_logits, labels, 3.0), **TOL)
    if labelled:
        ce = F.cross_entropy(logits.double(), labels, label_smoothing=0.1)
        torch.testing.assert_close(out.parts["ce"].double(), ce, **TOL)
        expected = expected + 0.7 * ce
    else:
        assert "ce" not in out.parts
    for stage, e in zip((1, 2, 3, 4), eps):
        head_logits = method.heads[f"s{stage}"](features[stage])
        branch = hand_ofa(head_logits, teacher_logits, labels, e)
        torch.testing.assert_close(out.parts[f"ofa_s{stage}"].double(), branch, **TOL)
        expected = expected + 0.3 * branch
    torch.testing.assert_close(out.loss.double(), expected, **TOL)
    assert all(not p.requires_grad for p in out.parts.values())


@pytest.mark.parametrize(
    "teacher_family,student_name,size",
    [("swin", "test_vit", 16), ("vit", "small_mixer", 32), ("beit", "small_resmlp", 32), ("deit", "test_resnet", 20)],
)
def test_method_forward_reaches_every_head_and_the_student_not_the_teacher(
    tmp_path, teacher_family, student_name, size
):
    torch.manual_seed(0)
    student = small_student(student_name)
    teacher = load_teacher(tiny_teacher(teacher_family))
    method = OFADistillation(tiny_args(tmp_path, distill_method="ofa"), student, teacher)
    pixels = torch.randn(4, 3, size, size)
    batch = DistillationBatch(pixels, torch.tensor([0, 1, 2, 0]), torch.randn(4, 3, 16, 16))
    out = method(student, teacher, batch)
    assert set(out.parts) == {"ce", "ofa", "ofa_s1", "ofa_s2", "ofa_s3", "ofa_s4"}
    out.loss.backward()
    for name, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.model.parameters())


def test_registry_and_settings(tmp_path):
    assert get_method("ofa") is OFADistillation
    student = create_student("test_resnet", num_classes=3, img_size=20)
    method = make_method(tmp_path, student, ofa_stages=[2, 4], ofa_epsilon=[1.5], ofa_weight=0.1)
    settings = json.loads(json.dumps(method.settings()))
    assert settings["method"] == "ofa" and settings["temperature"] == 1.0
    assert settings["ofa_epsilon"] == [1.5, 1.5, 1.5] and settings["ofa_stages"] == [2, 4]
    assert settings["ofa_weight"] == 0.1


# ---- end to end through the trainer --------------------------------------------------------------------------


def build(tmp_path, teacher, student, teacher_processor=None, **overrides):
    dataset = make_image_dataset(n=16)
    view = ImageView.from_timm(student)
    teacher_view = load_teacher(teacher, image_processor=teacher_processor).view
    return PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=tiny_args(tmp_path, distill_method="ofa", **overrides),
        train_dataset=with_image_transforms(dataset, view, teacher_view, train=True),
        eval_dataset=with_image_transforms(dataset, view, None, train=False),
        teacher_image_processor=teacher_processor,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "teacher_family,student_name",
    [
        ("vit", "test_resnet"),
        ("swin", "test_vit"),
        ("convnext", "deit_tiny_distilled_patch16_224"),
        ("resnet", "test_convnext"),
        ("timm_wrapper", "mobilenetv2_100"),
    ],
)
def test_ofa_trains_end_to_end(tmp_path, teacher_family, student_name):
    teacher = tiny_teacher(teacher_family)
    student = small_student(student_name)
    processor = small_processor() if teacher_family in ("resnet", "timm_wrapper") else None
    before_teacher, before_student = snapshot(teacher), snapshot(student)
    trainer = build(tmp_path, teacher, student, processor, max_steps=1)
    before_heads = snapshot(trainer.method.heads)
    trainer.train()

    assert all(torch.equal(before_teacher[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before_student[k], v) for k, v in student.state_dict().items())
    heads = trainer.method.heads.state_dict()
    assert any(not torch.equal(before_heads[k], v) for k, v in heads.items())
    # The heads are in the optimizer, the teacher is not.
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in trainer.method.heads.parameters()} <= optimised
    assert not optimised & {id(p) for p in teacher.parameters()}
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(
        {"loss_ce", "loss_ofa", "loss_ofa_s1", "loss_ofa_s2", "loss_ofa_s3", "loss_ofa_s4"} <= set(h) for h in logs
    )
    metrics = trainer.evaluate()
    assert "eval_loss_ce" in metrics and not any("ofa" in k for k in metrics)


def test_checkpoint_keeps_heads_and_export_drops_them(tmp_path):
    student = create_student("test_resnet", num_classes=3, img_size=20)
    trainer = build(
        tmp_path,
        tiny_teacher("vit"),
        student,
        ofa_stages=[1, 4],
        ofa_epsilon=[1.0, 1.5, 2.0],
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
    )
    trainer.train()
    ckpt = os.path.join(trainer.args.output_dir, "checkpoint-1")
    state = load_file(os.path.join(ckpt, "distill_state.safetensors"))
    assert set(state) == set(trainer.method.state_dict()) and {k.split(".")[1] for k in state} == {"s1", "s4"}
    manifest = json.load(open(os.path.join(ckpt, "distill_manifest.json")))
    assert manifest["method"]["ofa_epsilon"] == [1.0, 1.5, 2.0]
    assert set(load_file(os.path.join(ckpt, "model.safetensors"))) == set(student.state_dict())

    export = tmp_path / "export"
    trainer.save_model(str(export))
    assert set(load_file(os.path.join(export, "model.safetensors"))) == set(student.state_dict())
    assert not os.path.exists(os.path.join(export, "distill_state.safetensors"))

    # Resuming restores the heads exactly.
    fresh = build(
        tmp_path,
        tiny_teacher("vit"),
        create_student("test_resnet", num_classes=3, img_size=20),
        ofa_stages=[1, 4],
        ofa_epsilon=[1.0, 1.5, 2.0],
        max_steps=1,
    )
    fresh._load_from_checkpoint(ckpt)
    for k, v in fresh.method.state_dict().items():
        torch.testing.assert_close(v, state[k])
