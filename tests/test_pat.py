"""PAT end to end: identity at beta = 0, gradients, feedback state, export, parameter counts."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import transformers as tf
from safetensors.torch import load_file
from transformers import ViTImageProcessor

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.methods.base import DistillationBatch
from pat_hf.methods.pat import PerspectiveAwareTeaching
from pat_hf.models.teacher import load_teacher
from support.tiny import TEACHER_FAMILIES, make_image_dataset, tiny_args, tiny_teacher

SMALL = {"pat_dim": 32, "pat_num_heads": 4}


def processor_for(family: str):
    return ViTImageProcessor(size={"height": 24, "width": 24}) if family in ("resnet", "timm_wrapper") else None


def pat_trainer(tmp_path, family="vit", student_name="test_resnet", student_kwargs=None, dataset=None, **overrides):
    torch.manual_seed(0)
    student = create_student(student_name, num_classes=3, **(student_kwargs or {"img_size": 20}))
    teacher = tiny_teacher(family)
    dataset = dataset if dataset is not None else make_image_dataset()
    view = ImageView.from_timm(student)
    args = tiny_args(tmp_path, distill_method="pat", **{**SMALL, **overrides})
    return PATDistillationTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=with_image_transforms(dataset, view, None, train=True),
        eval_dataset=with_image_transforms(dataset, view, None, train=False),
        teacher_image_processor=processor_for(family),
    )


@pytest.mark.parametrize("family", TEACHER_FAMILIES)
def test_prompted_teacher_equals_plain_teacher_at_beta_zero(tmp_path, family):
    trainer = pat_trainer(tmp_path, family)
    method = trainer.method
    teacher = trainer.teacher
    x = torch.randn(4, 3, *teacher.view.size)
    # Feedback present too: beta = 0 must hide it as well.
    method.feedback = [torch.randn(4, s.channels, s.height, s.width) for s in method.teacher_output_specs]
    with torch.no_grad(), method.teacher_taps.capture() as plain_features:
        plain = teacher(x)
    with torch.no_grad():
        prompted, prompted_features = method.prompted_teacher_forward(teacher, x, method.feedback)
    assert torch.equal(prompted, plain)
    for a, b in zip(prompted_features, plain_features):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", TEACHER_FAMILIES)
def test_pat_trains_with_every_teacher_family(tmp_path, family):
    trainer = pat_trainer(tmp_path, family, num_train_epochs=2)
    teacher_before = {k: v.clone() for k, v in trainer.teacher.model.state_dict().items()}
    method_before = {k: v.clone() for k, v in trainer.method.named_parameters()}
    trainer.train()
    method = trainer.method
    # The teacher never moves; every trainable head does (prompts too, once beta left 0).
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher.model.state_dict().items())
    assert not trainer.teacher.model.training
    unchanged = [k for k, v in method.named_parameters() if torch.equal(method_before[k], v)]
    # Tiny teachers give SE blocks of 1-2 hidden units whose ReLU can be dead for a whole batch; the
    # student side and every beta must move, the prompt blocks as a whole too.
    assert not [k for k in unchanged if not k.startswith(("prompts.", "feedback_aligners."))], unchanged
    assert all(p.beta.item() != 0 for p in method.prompts.values())
    assert any(not k.startswith("prompts.") or k.endswith("beta") for k in method_before) and len(unchanged) < len(
        [k for k in method_before if k.startswith("prompts.")]
    )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all({"loss_ce", "loss_kd", "loss_hcl", "loss_reg"} <= set(h) for h in logs)
    metrics = trainer.evaluate()
    assert "eval_accuracy" in metrics and "eval_loss_hcl" not in metrics  # evaluation: the student alone


@pytest.mark.parametrize(
    "student_name,kwargs",
    [
        ("test_vit", {"img_size": 16}),
        ("test_convnext", {"img_size": 32}),
        ("mobilenetv2_050", {"img_size": 32}),
        ("mixer_s32_224", {"img_size": 64}),
    ],
)
def test_pat_trains_each_student_family(tmp_path, student_name, kwargs):
    trainer = pat_trainer(tmp_path, "swin", student_name, kwargs)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items() if v.is_floating_point())


def test_gradients_reach_student_heads_and_prompts_not_teacher(tmp_path):
    # zero_init_last=False: timm zero-initialises each block's last BN, which blocks gradients at step 0.
    trainer = pat_trainer(tmp_path, "convnext", student_kwargs={"img_size": 20, "zero_init_last": False})
    method = trainer.method
    with torch.no_grad():
        for prompt in method.prompts.values():
            prompt.beta.fill_(0.5)  # so the prompt parameters get gradients on the first step
            # Tiny teachers give SE blocks of one hidden unit; keep its ReLU alive so connectivity is what we test.
            prompt.fuse_se.reduce.bias.fill_(5.0)
            prompt.prompt_se.reduce.bias.fill_(5.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    model = trainer.model.train()
    method.feedback = [None] * 4
    model(**batch)["loss"].backward()  # step 1: fills the feedback
    model.zero_grad()
    out = model(**batch)  # step 2: the feedback branch takes part
    out["loss"].backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing, missing
    assert all(p.grad is None for p in trainer.teacher.model.parameters())


def test_feedback_is_detached_per_stage_and_skipped_for_other_batch_sizes(tmp_path):
    trainer = pat_trainer(tmp_path, "vit", dataset=make_image_dataset(n=20), per_device_train_batch_size=8)
    method = trainer.method
    seen = []
    for prompt in method.prompts.values():
        prompt.register_forward_pre_hook(lambda mod, args: seen.append(args[1] is not None))
    trainer.train()  # batches of 8, 8, 4
    assert seen == [False] * 4 + [True] * 4 + [False] * 4  # no feedback at first, none for the short batch
    for fb, spec in zip(method.feedback, method.teacher_output_specs):
        assert fb.shape == (4, spec.channels, spec.height, spec.width) and not fb.requires_grad


def forward_counting_block_activations(model, blocks, batch, saved: list[int]):
    """The model's forward, appending to ``saved`` the bytes autograd keeps inside the given blocks (weights are
    kept by reference and cost nothing; the plain teacher pass keeps nothing: no_grad)."""
    weights = {p.data_ptr() for p in model.parameters()} | {p.data_ptr() for b in blocks for p in b.parameters()}
    inside: list[bool] = []

    def pack(tensor):
        if inside and tensor.data_ptr() not in weights:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    handles = [block.register_forward_pre_hook(lambda *_: inside.append(True)) for block in blocks]
    handles += [block.register_forward_hook(lambda *_: inside.clear()) for block in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            return model(**batch)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", TEACHER_FAMILIES)
def test_recomputed_teacher_pass_gives_the_same_loss_and_gradients_with_fewer_saved_tensors(tmp_path, family):
    trainer = pat_trainer(tmp_path, family, student_kwargs={"img_size": 20, "zero_init_last": False})
    method, model = trainer.method, trainer.model.train()
    with torch.no_grad():
        for prompt in method.prompts.values():
            prompt.beta.fill_(0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    model(**batch)  # fills the feedback, so both passes below see the same, non-empty feedback
    feedback = list(method.feedback)
    results = []
    for recompute in (True, False):
        method.checkpoint_teacher = recompute
        method.feedback = list(feedback)
        model.zero_grad()
        saved: list[int] = []
        out = forward_counting_block_activations(model, method.teacher_taps.blocks, batch, saved)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out["loss"].detach(), grads, [f.clone() for f in method.feedback], sum(saved)))
    (loss_a, grads_a, fb_a, saved_a), (loss_b, grads_b, fb_b, saved_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and any(k.startswith("method.prompts") for k in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(fb_a, fb_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The teacher's blocks kept only their inputs.
    assert 0 < saved_a < 0.5 * saved_b, (saved_a, saved_b)
    assert all(p.grad is None for p in trainer.teacher.model.parameters())


def test_prompt_effect_measures_what_the_prompts_change_and_restores_the_method(tmp_path):
    trainer = pat_trainer(tmp_path, "convnext")
    method, teacher, student = trainer.method, trainer.teacher, trainer.model.student
    torch.manual_seed(1)
    batches = [
        DistillationBatch(
            pixel_values=torch.randn(4, 3, 20, 20),
            labels=torch.randint(0, 3, (4,)),
            teacher_pixel_values=torch.randn(4, 3, *teacher.view.size),
        )
        for _ in range(2)
    ]
    feedback = [None] * 4
    method.feedback = feedback
    method.train()
    student.train()

    # beta = 0: the prompted teacher is the plain teacher.
    effect = method.prompt_effect(student, teacher, batches)
    assert effect["feature_change"] == [0.0] * 4 and effect["logit_kl"] == 0.0
    assert effect["prompted_top1"] == effect["plain_top1"] and effect["images"] == 8
    with torch.no_grad():
        plain = torch.cat([teacher(b.teacher_pixel_values) for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert effect["plain_top1"] == (plain.argmax(-1) == labels).float().mean().item()
    assert method.feedback is feedback and method.training and student.training

    with torch.no_grad():
        for stage, prompt in method.prompts.items():
            prompt.beta.fill_(0.1 * int(stage))
    # One batch: the relative change of each stage output, against a direct computation.
    method.eval()
    with torch.no_grad(), method.teacher_taps.capture() as plain_features:
        teacher(batches[0].teacher_pixel_values)
    with torch.no_grad():
        _, prompted_features = method.prompted_teacher_forward(teacher, batches[0].teacher_pixel_values, [None] * 4)
    expected = [float((p - q).norm() / q.norm()) for p, q in zip(prompted_features, plain_features)]
    method.train()
    effect = method.prompt_effect(student, teacher, batches[:1])
    assert effect["feature_change"] == pytest.approx(expected, rel=1e-6) and min(expected) > 0
    assert effect["beta"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4})

    # Two batches: the second batch's prompts see the feedback of the first, as in training.
    seen = []
    for prompt in method.prompts.values():
        prompt.register_forward_pre_hook(lambda mod, args: seen.append(args[1] is not None))
    method.prompt_effect(student, teacher, batches)
    assert seen == [False] * 4 + [True] * 4
    assert method.feedback is feedback and method.training


def test_feedback_never_reaches_evaluation(tmp_path):
    trainer = pat_trainer(tmp_path, "vit")
    trainer.train()
    first = trainer.predict(trainer.eval_dataset).predictions
    trainer.method.feedback = [torch.randn_like(f) * 100 for f in trainer.method.feedback]
    for prompt in trainer.method.prompts.values():
        prompt.beta.data.fill_(10.0)
    second = trainer.predict(trainer.eval_dataset).predictions
    assert (first == second).all()


@pytest.mark.parametrize("checkpoint_teacher", [False, True])
def test_checkpoint_keeps_heads_and_feedback_and_resume_is_exact(tmp_path, checkpoint_teacher):
    from transformers import TrainerCallback

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 3
            return control

    full = pat_trainer(
        tmp_path / "full",
        "swin",
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=3,
        pat_checkpoint_teacher=checkpoint_teacher,
    )
    full.train()
    part = pat_trainer(
        tmp_path / "part",
        "swin",
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=3,
        pat_checkpoint_teacher=checkpoint_teacher,
    )
    part.add_callback(StopAt3())
    part.train()
    ckpt = os.path.join(part.args.output_dir, "checkpoint-3")
    state = load_file(os.path.join(ckpt, "distill_state.safetensors"))
    assert any(k.startswith("prompts.") for k in state) and any(k.startswith("raa.") for k in state)
    assert {f"__extra__.feedback.{i}" for i in range(4)} <= set(state)
    resumed = pat_trainer(
        tmp_path / "part",
        "swin",
        num_train_epochs=2,
        save_strategy="steps",
        save_steps=3,
        pat_checkpoint_teacher=checkpoint_teacher,
    )
    resumed.train(resume_from_checkpoint=True)
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, full.model.state_dict()[key], rtol=0, atol=0, msg=key)
    for a, b in zip(resumed.method.feedback, full.method.feedback):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_holds_no_head_prompt_or_teacher_tensor(tmp_path):
    trainer = pat_trainer(tmp_path, "convnext")
    trainer.train()
    trainer.save_model()
    exported = load_file(os.path.join(trainer.args.output_dir, "model.safetensors"))
    assert set(exported) == set(trainer.student.state_dict())
    assert not any(k.startswith(("prompts", "raa", "aligners", "method", "teacher")) for k in exported)
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "distill_state.safetensors"))


def test_resume_with_other_pat_settings_is_refused(tmp_path):
    first = pat_trainer(tmp_path, "vit", save_strategy="steps", save_steps=3)
    first.train()
    other = pat_trainer(tmp_path, "vit", save_strategy="steps", save_steps=3, pat_prompt_stages=[2, 3])
    with pytest.raises(ValueError, match=r"(?s)belongs to another run.*pat_prompt_stages"):
        other.train(resume_from_checkpoint=True)


# ---- parameter counts against the official modules (224x224, 100 classes, defaults) -------------------------


def extra_parameters(tmp_path, teacher, student) -> int:
    args = tiny_args(tmp_path, distill_method="pat")
    method = PerspectiveAwareTeaching(args, student, load_teacher(teacher))
    return sum(p.numel() for p in method.parameters() if p.requires_grad)


def hf_convnext_tiny():
    return tf.ConvNextForImageClassification(
        tf.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], num_labels=100)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "pair,expected",
    [
        # Counted on the official modules (their timm 0.6.5 models): exact integers, no tolerance.
        ("convnext_t-deit_t", 14_475_236),
        ("swin_t-resnet18", 38_521_997),
        ("vit_s-mobilenetv2", 26_405_716),
        ("convnext_t-resmlp_s12", 20_766_692),
    ],
)
def test_parameter_counts_match_the_official_modules(tmp_path, pair, expected):
    with torch.device("cpu"):
        if pair == "convnext_t-deit_t":
            teacher, student = hf_convnext_tiny(), timm.create_model("deit_tiny_patch16_224", num_classes=100)
        elif pair == "swin_t-resnet18":
            teacher = tf.SwinForImageClassification(
                tf.SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], num_labels=100)
            )
            student = timm.create_model("resnet18", num_classes=100)
        elif pair == "vit_s-mobilenetv2":
            teacher = tf.ViTForImageClassification(
                tf.ViTConfig(
                    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=100
                )
            )
            student = timm.create_model("mobilenetv2_100", num_classes=100)
        else:
            teacher, student = hf_convnext_tiny(), timm.create_model("resmlp_12_224", num_classes=100)
    assert extra_parameters(tmp_path, teacher, student) == expected


STUDENT_FAMILIES = [
    ("test_resnet", {"img_size": 20}),
    ("mobilenetv2_050", {"img_size": 32}),
    ("mobilenetv3_small_050", {"img_size": 32}),
    ("test_efficientnet", {"img_size": 32}),
    ("test_convnext", {"img_size": 32}),
    ("test_vit", {"img_size": 16}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}),
    (
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "window_size": 2, "embed_dim": 16, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 2, 2)},
    ),
    ("mixer_s32_224", {"img_size": 64}),
    ("resmlp_12_224", {"img_size": 64}),
]


@pytest.mark.parametrize("method", ["pat", "ofa"])
@pytest.mark.parametrize("family", TEACHER_FAMILIES)
@pytest.mark.parametrize("student_name,kwargs", STUDENT_FAMILIES, ids=[s for s, _ in STUDENT_FAMILIES])
def test_every_teacher_family_with_every_student_family(tmp_path, method, family, student_name, kwargs):
    """One optimizer step for each teacher x student x method: builds, runs forward and backward, stays finite."""
    torch.manual_seed(0)
    student = create_student(student_name, num_classes=3, **kwargs)
    dataset = make_image_dataset(n=4)
    view = ImageView.from_timm(student)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher(family),
        args=tiny_args(tmp_path, distill_method=method, max_steps=1, per_device_train_batch_size=4, **SMALL),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
        teacher_image_processor=processor_for(family),
    )
    before = {k: v.clone() for k, v in student.state_dict().items() if v.is_floating_point()}
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if k in before)


def test_no_weight_decay_on_scalars_norms_biases_and_tokens(tmp_path):
    trainer = pat_trainer(tmp_path, "vit", "test_vit", {"img_size": 16}, weight_decay=0.05)
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    names = dict(trainer.model.named_parameters())
    assert not any(n.endswith(".beta") for n in decayed)
    assert "student.cls_token" not in decayed and "student.pos_embed" not in decayed
    assert all(names[n].ndim > 1 for n in decayed)
    assert "method.raa.q.weight" in decayed and "student.patch_embed.proj.weight" in decayed


def test_aligners_are_built_as_the_official_modules(tmp_path):
    """Bias-free 1x1 convolutions (map and feedback aligners); the token aligner normalises the queries before
    Linear(D -> C) and the channels before Linear(queries -> L)."""
    from pat_hf.methods.pat import FeedbackAligner, StageAligner
    from pat_hf.models.taps import StageSpec

    token = StageAligner(StageSpec("tokens", 24, 4, 4, prefix_tokens=1), num_tokens=16, dim=32)
    assert (token.token_norm.num_features, token.channel_norm.num_features) == (16, 24)
    assert (token.proj.in_features, token.proj.out_features) == (32, 24)
    assert (token.token_proj.in_features, token.token_proj.out_features) == (16, 16)
    out = token(torch.randn(3, 16, 32))
    assert out.shape == (3, 24, 4, 4)
    mapped = StageAligner(StageSpec("map", 24, 8, 8), num_tokens=16, dim=32)
    assert mapped.proj.bias is None and mapped(torch.randn(3, 16, 32)).shape == (3, 24, 8, 8)
    feedback = FeedbackAligner(StageSpec("map", 24, 4, 4), StageSpec("map", 12, 8, 8))
    assert feedback.proj.bias is None and feedback(torch.randn(2, 24, 4, 4)).shape == (2, 12, 8, 8)


def test_a_checkpoint_with_other_head_shapes_is_refused_naming_the_file(tmp_path):
    """A PAT checkpoint whose heads no longer fit (pat_hf 0.1's aligners had biases) gets a message, not a raw
    load_state_dict error."""
    from safetensors.torch import load_file, save_file

    trainer = pat_trainer(tmp_path, "convnext", max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    state_file = tmp_path / "out" / "checkpoint-1" / "distill_state.safetensors"
    state = load_file(state_file)
    key = next(k for k in state if k.startswith("aligners.") and k.endswith("proj.weight"))
    state[key.replace("weight", "bias")] = torch.zeros(state[key].shape[0])
    save_file(state, state_file)
    # As a 0.1 checkpoint: no file list to check against, and a manifest that says 0.1 (only 0.1 wrote none).
    (state_file.parent / "checkpoint_files.json").unlink()
    manifest_file = state_file.parent / "distill_manifest.json"
    manifest_file.write_text(json.dumps({**json.loads(manifest_file.read_text()), "pat_hf_version": "0.1.0"}))
    again = pat_trainer(tmp_path, "convnext", max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.raises(
        ValueError, match=r"(?s)distill_state.safetensors does not fit the 'pat' heads.*written by pat_hf"
    ):
        again.train(resume_from_checkpoint=True)
