"""PAT, OFA-KD and FitNet on any architecture: transformers teachers and timm students outside the family rules.

Each case builds a tiny random teacher (a transformers image-classification type) and a tiny random timm student
with the coverage probe's builders (``benchmarks/model_coverage.py``), trains 2 steps through
:class:`pat_hf.PATDistillationTrainer` and asserts that every loss part is finite and non-zero, that the taps read
distinct stages of growing depth, and (PAT) that the prompts change the teacher's output once their scale is not 0.
The fast lane samples 6 teacher types and 6 timm families; the slow lane pairs the rest.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import ViTImageProcessor

import benchmarks.model_coverage as coverage
from pat_hf import ImageView, PATDistillationTrainer, with_image_transforms
from pat_hf.models.taps import build_taps
from support.tiny import make_image_dataset, tiny_args, tiny_teacher

FEATURE_PART = {"pat": "loss_hcl", "fitnet": "loss_hint", "ofa": "loss_ofa_s"}

# (teacher type, timm student): each fast pair mixes a generic teacher with a generic student.
FAST_PAIRS = [
    ("dinov2_with_registers", "fastvit_t8"),  # 5 prefix tokens; a reparameterisable CNN
    ("convnextv2", "levit_128s"),  # maps; a student with 3 token stages
    ("segformer", "test_coatnet"),  # hidden states reshaped from tokens; a hybrid
    ("mobilenet_v2", "pvt_v2_b0"),  # 16 hidden states; overlapping patch embedding (kernel 7, stride 4)
    ("cvt", "efficientvit_b0"),  # 3 stages; MIT EfficientViT
    ("focalnet", "cait_xxs24_224"),  # tokens after downsampling, 3 stages; class-attention ViT
]
SLOW_PAIRS = [
    ("bit", "repvit_m0_9"),
    ("clip", "tiny_vit_5m_224"),
    ("data2vec-vision", "edgenext_xx_small"),
    ("efficientnet", "ghostnet_050"),
    ("hiera", "regnetx_002"),
    ("ijepa", "beit_base_patch16_224"),
    ("levit", "eva02_tiny_patch14_224"),
    ("metaclip_2", "hiera_tiny_224"),
    ("mobilenet_v1", "gcvit_xxtiny"),
    ("mobilevit", "swinv2_cr_tiny_224"),
    ("mobilevitv2", "pit_ti_224"),
    ("poolformer", "hgnetv2_b0"),
    ("pp_lcnet", "xcit_nano_12_p16_224"),
    ("pvt", "davit_tiny"),
    ("pvt_v2", "densenet121"),
    ("regnet", "ese_vovnet19b_dw"),
    ("siglip", "starnet_s1"),
    ("swiftformer", "test_mambaout"),
    ("swinv2", "mobilevitv2_050"),
    ("textnet", "test_nfnet"),
    ("vit_msn", "test_byobnet"),
    ("donut-swin", "test_maxvit"),
    ("hgnet_v2", "test_vit_relpos"),
]


def _params(pairs, slow=False):
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(t, s, m, id=f"{t}-{s}-{m}", marks=marks) for t, s in pairs for m in ("pat", "ofa", "fitnet")]


def _stage_order(taps, model, pixels):
    """Stage indices in the order the forward reaches their outputs (first time each)."""
    order: list[int] = []
    handles = [
        site.out_module.register_forward_hook(lambda *_, i=i: order.append(i) if i not in order else None)
        for i, site in enumerate(taps._sites)
    ]
    try:
        with torch.no_grad():
            model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _check_taps(taps, model, pixels):
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), taps.capture() as features:
            model(pixels)
        assert len(features) == taps.num_stages >= 1
        for i in range(len(features)):
            for j in range(i + 1, len(features)):
                assert features[i] is not features[j]
                if features[i].shape == features[j].shape:
                    assert not torch.equal(features[i], features[j]), f"stages {i} and {j} read the same feature"
        assert _stage_order(taps, model, pixels) == list(range(taps.num_stages))
        patches = [spec.num_patches for spec in taps.output_specs]
        assert patches == sorted(patches, reverse=True), f"stage grids grow with depth: {taps.output_specs}"
    finally:
        model.train(was)


def _train(teacher_type, student_name, method, tmp_path, **overrides):
    teacher = coverage.build_teacher(teacher_type)
    student = coverage.build_student(student_name)
    size = getattr(teacher.config, "image_size", None) or coverage.TEACHER_SIZE
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    view = ImageView.from_timm(student)
    extra = {"pat_dim": 32, "pat_num_heads": 4} if method == "pat" else {}
    args = tiny_args(
        tmp_path, distill_method=method, max_steps=2, per_device_train_batch_size=3, **{**extra, **overrides}
    )
    trainer = PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=with_image_transforms(make_image_dataset(n=6, size=24), view, None, train=True),
        teacher_image_processor=ViTImageProcessor(size={"height": size, "width": size}),
    )
    trainer.train()
    return trainer, view, size


def _run_case(teacher_type, student_name, method, tmp_path):
    torch.manual_seed(0)
    trainer, view, teacher_size = _train(teacher_type, student_name, method, tmp_path)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        parts = {k: v for k, v in entry.items() if k.startswith("loss_")}
        assert parts and all(math.isfinite(v) for v in parts.values()), parts
        # PAT's regulariser KL(z_t ‖ z_t0) is 0 by design while the prompts' scale β is still (about) 0: the
        # prompted teacher starts as the plain one. The prompts' effect is checked below with β set to 1.
        assert all(v != 0 for k, v in parts.items() if k != "loss_reg"), parts
        assert any(k.startswith(FEATURE_PART[method]) for k in parts), parts
    method_module = trainer.method
    pixels = torch.rand(2, 3, *view.size)
    teacher_pixels = torch.rand(2, 3, teacher_size, teacher_size)
    student_taps = getattr(method_module, "student_taps", None) or method_module._taps
    _check_taps(student_taps, trainer.student, pixels)
    if method == "ofa":
        assert getattr(method_module, "teacher_taps", None) is None  # OFA never taps the teacher
        return
    _check_taps(method_module.teacher_taps, trainer.teacher.model, teacher_pixels)
    if method == "pat":
        teacher = trainer.teacher.model
        with torch.no_grad():
            for prompt in method_module.prompts.values():
                prompt.beta.fill_(1.0)
            plain = coverage._logits(teacher(teacher_pixels))
            method_module.teacher_taps.set_input_transforms(method_module._prompt_transforms)
            try:
                prompted = coverage._logits(teacher(teacher_pixels))
            finally:
                method_module.teacher_taps.set_input_transforms(None)
        assert method_module.prompt_stages
        assert not torch.equal(plain, prompted)


@pytest.mark.parametrize(("teacher_type", "student_name", "method"), _params(FAST_PAIRS))
def test_feature_methods_train_on_any_pair(teacher_type, student_name, method, tmp_path):
    _run_case(teacher_type, student_name, method, tmp_path)


@pytest.mark.parametrize(("teacher_type", "student_name", "method"), _params(SLOW_PAIRS, slow=True))
def test_feature_methods_train_on_any_pair_slow(teacher_type, student_name, method, tmp_path):
    _run_case(teacher_type, student_name, method, tmp_path)


def test_hidden_states_are_read_where_the_model_produces_them():
    """DINOv2 with registers: 1 cls + 4 register tokens found (not assumed), and the taps' stage 4 output is the
    hidden state transformers returns for that block."""
    teacher = coverage.build_teacher("dinov2_with_registers")
    taps = build_taps(teacher, image_size=32)
    try:
        assert [spec.prefix_tokens for spec in taps.output_specs] == [5] * 4
        pixels = torch.rand(1, 3, 32, 32)
        with torch.no_grad(), taps.capture() as features:
            hidden = teacher(pixel_values=pixels, output_hidden_states=True).hidden_states
        layers = teacher.config.num_hidden_layers
        assert torch.equal(features[-1], hidden[layers])
        assert torch.equal(features[0], hidden[round(layers * 2 / 12) or 1])
    finally:
        taps.remove()


def test_swin_like_teachers_keep_the_pre_downsampling_rule():
    """Why the Swin family rule stays: transformers' Swin-like stages (Swin, Swin V2, Donut) return their hidden
    state AFTER their own downsampling, so the generic rule would read stage s at the grid and width of stage
    s + 1. The family rule reads each stage's last block (the method's stage feature): the grid halves per stage
    starting at the patch grid, with the width of the stage itself."""
    for model_type in ("swin", "swinv2", "donut-swin"):
        teacher = coverage.build_teacher(model_type)
        size = teacher.config.image_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        taps = build_taps(teacher, image_size=size)
        try:
            assert taps.family == "hf_swin"
            grid = size // teacher.config.patch_size
            embed = teacher.config.embed_dim
            assert [(s.height, s.channels) for s in taps.output_specs] == [(grid >> i, embed << i) for i in range(4)]
            hidden = teacher(pixel_values=torch.rand(1, 3, size, size), output_hidden_states=True).hidden_states
            assert hidden[1].shape[1] == (grid // 2) ** 2  # after stage 1's downsampling
        finally:
            taps.remove()


@pytest.mark.slow  # ~12 s: CvT's smallest buildable config has 20M parameters
def test_three_stage_models_run_with_three_stages_and_explicit_stage_four_is_refused(tmp_path):
    """CvT (3 hidden-state stages) with a LeViT student (3 stages): OFA's and PAT's stage lists follow; an explicit
    stage 4 is refused at construction with a message naming the model."""
    torch.manual_seed(0)
    trainer, _, _ = _train("cvt", "levit_128s", "pat", tmp_path)
    assert trainer.method.num_stages == 3
    # CvT's first hidden state is its first stage's output: no module gives that stage's input, so by default the
    # prompts go at the inputs of stages 2 and 3 only.
    assert trainer.method.teacher_taps.input_specs[0] is None
    assert sorted(trainer.method.prompts) == ["2", "3"]
    with pytest.raises(ValueError, match=r"levit_128s.*3 stage"):
        _train("cvt", "levit_128s", "ofa", tmp_path, ofa_stages=[4])
    for stages in ([4], [1]):
        with pytest.raises(ValueError, match=r"CvtForImageClassification.*prompts can go"):
            _train("cvt", "levit_128s", "pat", tmp_path, pat_prompt_stages=stages)


def test_siglip2_teacher_is_refused_at_construction(tmp_path):
    """SigLIP-2 reads pre-patchified pixels with a mask and spatial shapes: refused before training, by name."""
    with pytest.raises(ValueError, match=r"Siglip2ForImageClassification.*pixel_attention_mask"):
        _train("siglip2", "test_resnet", "kd", tmp_path)


@pytest.mark.parametrize("size", [48, 50])
def test_pvt_v2_student_runs_at_sizes_other_than_224(size, tmp_path):
    """PVT-v2's patch embedding is a 7x7 convolution of stride 4: the input-size check reads the stride (and the
    overlap), not ``patch_size`` (the kernel), so any size timm accepts trains."""
    from pat_hf import create_student

    student = create_student("pvt_v2_b0", num_classes=3, img_size=size)
    view = ImageView.from_timm(student)
    assert view.size == (size, size)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher("vit"),
        args=tiny_args(tmp_path, distill_method="kd", max_steps=1, per_device_train_batch_size=2),
        train_dataset=with_image_transforms(make_image_dataset(n=2), view, None, train=True),
    )
    assert math.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize("method", ["pat", "ofa", "fitnet"])
def test_last_batch_of_one_image_trains(method, tmp_path):
    """An epoch whose last batch holds one image (5 images, batch 4): BatchNorm layers of the method's heads in
    training mode must not fail on it (issue 23, class 5)."""
    from pat_hf import create_student

    torch.manual_seed(0)
    # 64 pixels: the student's own last stage keeps 2x2 positions, so only the method's heads meet 1 value.
    student = create_student("test_resnet", num_classes=3, img_size=64)
    view = ImageView.from_timm(student)
    extra = {"pat_dim": 32, "pat_num_heads": 4} if method == "pat" else {}
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher("convnext"),
        args=tiny_args(tmp_path, distill_method=method, num_train_epochs=1, per_device_train_batch_size=4, **extra),
        train_dataset=with_image_transforms(make_image_dataset(n=5), view, None, train=True),
    )
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert math.isfinite(result.training_loss)


def _specs(model, family, sites, size):
    from pat_hf.models.taps.engine import StageTaps

    taps = StageTaps(family, sites)
    try:
        taps._run_probe(model, size, 3)
        return list(taps.output_specs), list(taps.input_specs)
    finally:
        taps.remove()


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("resnet18", {}),
        ("convnext_atto", {}),
        ("mobilenetv3_small_100", {}),
        ("deit_tiny_distilled_patch16_224", {"img_size": 64}),
        ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 2}),
        ("resmlp_12_224", {"img_size": 64}),
    ],
)
def test_generic_timm_rule_reproduces_the_family_rules(name, kwargs):
    """On the timm families of the paper the generic rule (feature_info) finds the same stage outputs and inputs
    as the family rules: those are kept only for what the generic rule cannot know (the residual blocks that
    pat_checkpoint_teacher recomputes) and for the paper's own choices (MobileNetV2's conv head as stage 4,
    EfficientNet's first stage starting at the stem)."""
    from pat_hf import create_student
    from pat_hf.models.taps.families import _timm_family, _timm_sites
    from pat_hf.models.taps.generic import timm_generic_sites

    model = create_student(name, num_classes=3, **kwargs)
    family = _timm_family(model)
    size = (64, 64)
    assert _specs(model, family, _timm_sites(model, family, size), size) == _specs(
        model, "generic", timm_generic_sites(model, size, 3), size
    )


def test_mobilenetv2_keeps_the_official_conv_head_stage():
    """Why the MobileNetV2 rule stays: the official PAT code takes the 1280-channel conv head as stage 4 (the
    paper's head sizes depend on it); the generic rule would take the last block (320 channels)."""
    from pat_hf import create_student
    from pat_hf.models.taps.generic import timm_generic_sites

    model = create_student("mobilenetv2_100", num_classes=3)
    family_taps = build_taps(model, 64)
    try:
        assert family_taps.output_specs[-1].channels == 1280
    finally:
        family_taps.remove()
    generic, _ = _specs(model, "generic", timm_generic_sites(model, (64, 64), 3), (64, 64))
    assert generic[-1].channels == 320
