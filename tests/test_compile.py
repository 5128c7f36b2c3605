"""torch_compile=True: every method compiles by regions (no graph break, bounded recompiles) and trains, evaluates
and resumes as in eager mode; a compiled student is accepted.

Tolerances: with ``aot_eager`` the graphs run the same ATen kernels as eager after decomposition, so losses and,
with SGD (lr 1e-2), weights after 6 steps agree to float32 rounding (rtol 1e-5, atol 1e-5; none, kd and ofa came
out bit-identical, PAT's decomposed BatchNorm / attention round differently in the last bits). Inductor's CPU
kernels sum in another order: rtol and atol 1e-4 after 3 steps in float32; PAT's heads in float64 (HCL itself computes in
float32, as it does under bf16): loss to rtol 1e-7, gradients to rtol 1e-5 / atol 1e-8.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from transformers import TrainerCallback

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.models.compile import compile_options, is_compiled_module, unwrap_compiled
from support.tiny import make_image_dataset, tiny_args, tiny_teacher

SMALL = {"pat_dim": 32, "pat_num_heads": 4}
CONFIGS = {
    "none": {"distill_method": "none"},
    "kd": {"distill_method": "kd"},
    "dkd": {"distill_method": "dkd", "dkd_warmup_epochs": 1},
    "dist": {"distill_method": "dist"},
    "fitnet": {"distill_method": "fitnet"},
    "rsd": {"distill_method": "rsd"},
    "ofa": {"distill_method": "ofa"},
    "pat": {"distill_method": "pat", **SMALL},
    "pat_checkpoint": {"distill_method": "pat", "pat_checkpoint_teacher": True, **SMALL},
}


class GraphCount(TrainerCallback):
    """Dynamo's count of compiled graphs at the end of every epoch."""

    def __init__(self) -> None:
        self.per_epoch: list[int] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        self.per_epoch.append(counters["stats"]["unique_graphs"])


def make_trainer(tmp_path, config: str, compiled: bool | str, n: int = 24, student=None, **overrides):
    torch.manual_seed(0)
    student = student if student is not None else create_student("test_resnet", num_classes=3, img_size=20)
    settings = dict(CONFIGS[config])
    if compiled:
        settings.update(torch_compile=True, torch_compile_backend="aot_eager" if compiled is True else compiled)
    dataset = make_image_dataset(n=n)
    view = ImageView.from_timm(unwrap_compiled(student))
    trainer = PATDistillationTrainer(
        model=student,
        teacher=None if config == "none" else tiny_teacher("swin"),
        args=tiny_args(tmp_path, optim="sgd", learning_rate=1e-2, **{**settings, **overrides}),
        train_dataset=with_image_transforms(dataset, view, None, train=True),
        eval_dataset=with_image_transforms(dataset, view, None, train=False),
    )
    if config.startswith("pat"):
        with torch.no_grad():  # so that the prompts change the teacher from the first step on
            for prompt in trainer.method.prompts.values():
                prompt.beta.fill_(0.5)
    return trainer


def train_losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_same_run(eager, compiled, losses_e, losses_c, rtol, atol):
    torch.testing.assert_close(torch.tensor(losses_c), torch.tensor(losses_e), rtol=rtol, atol=0)
    reference = eager.model.state_dict()
    for key, value in compiled.model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=rtol, atol=atol, msg=key)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_compiled_training_matches_eager_without_graph_breaks_or_recompiles(tmp_path, config):
    """Two epochs of batches 8, 8, 4 (a short last batch), then an evaluation, compiled and eager."""
    eager = make_trainer(tmp_path / "eager", config, compiled=False, n=20, num_train_epochs=2)
    losses_e = train_losses(eager)
    metrics_e = eager.evaluate()
    compiled = make_trainer(tmp_path / "compiled", config, compiled=True, n=20, num_train_epochs=2)
    graphs = GraphCount()
    compiled.add_callback(graphs)
    # Accelerate was left nothing to compile: the wrapper is prepared plainly, its method compiles regions.
    assert not is_compiled_module(compiled.model) and compiled.method.compiling
    losses_c = train_losses(compiled)
    assert not is_compiled_module(compiled.model_wrapped)
    assert_same_run(eager, compiled, losses_e, losses_c, rtol=1e-5, atol=1e-5)
    if config.startswith("pat"):
        for a, b in zip(compiled.method.feedback, eager.method.feedback):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Epoch 1 compiles every region (the short batch once more, with a dynamic batch size); epoch 2 nothing.
    assert graphs.per_epoch[0] == graphs.per_epoch[1] > 0, graphs.per_epoch
    metrics_c = compiled.evaluate()
    assert not counters["graph_break"]
    for key in ("eval_loss", "eval_accuracy"):
        assert metrics_c[key] == pytest.approx(metrics_e[key], rel=1e-5), key


@pytest.mark.slow
def test_inductor_matches_eager(tmp_path):
    """The real compiler (C++ kernels on the CPU): the teacher's no-grad pass, the student and the loss."""
    eager = make_trainer(tmp_path / "eager", "kd", compiled=False, max_steps=3)
    losses_e = train_losses(eager)
    compiled = make_trainer(tmp_path / "compiled", "kd", compiled="inductor", max_steps=3)
    losses_c = train_losses(compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_same_run(eager, compiled, losses_e, losses_c, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_pat_heads_compiled_by_inductor_equal_the_eager_ones_in_float64():
    """PAT's launch-bound pieces as the step compiles them (prompt blocks with feedback, RAA + aligners, HCL), by
    inductor in float64: values and gradients as the eager modules, which test_prompts checks against the plain
    convolutions."""
    from pat_hf.losses import hcl_loss
    from pat_hf.methods.pat import AdaptiveFeedbackPrompt, RegionAwareAttention, StageAligner
    from pat_hf.models.taps import StageSpec

    torch.manual_seed(0)
    prompt = AdaptiveFeedbackPrompt(8).double()
    for p in prompt.parameters():
        torch.nn.init.normal_(p, std=0.3)
    student_specs = [StageSpec("map", 8, 8, 8), StageSpec("map", 16, 4, 4), StageSpec("tokens", 16, 2, 2, 1)] * 2
    raa = RegionAwareAttention(student_specs[:4], num_queries=16, dim=16, num_heads=2).double()
    aligners = torch.nn.ModuleList(
        [StageAligner(StageSpec("map", 8, 4, 4), 4, 16), StageAligner(StageSpec("tokens", 8, 4, 4, 1), 4, 16)]
    ).double()

    def heads(x, feedback, features, target_map, target_tokens):
        out = prompt(x, feedback)
        regions = raa(features)
        aligned = [aligners[0](regions[0]), aligners[1](regions[1])]
        return out.square().sum() + hcl_loss(aligned[0], target_map) + hcl_loss(aligned[1], target_tokens)

    def inputs():
        g = torch.Generator().manual_seed(1)
        shapes = [(3, 8, 6, 6), (3, 8, 6, 6), (3, 8, 8, 8), (3, 16, 4, 4), (3, 5, 16), (3, 8, 8, 8)]
        tensors = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
        targets = [torch.randn(3, 8, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
        return tensors, targets

    params = [*prompt.parameters(), *raa.parameters(), *aligners.parameters()]
    results = []
    for fn in (heads, torch.compile(heads, backend="inductor")):
        (x, fb, *features), targets = inputs()
        loss = fn(x, fb, features, *targets)
        grads = torch.autograd.grad(loss, [x, fb, *features, *params], allow_unused=True)
        results.append((loss.detach(), grads))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-7, atol=0)
    for a, b in zip(grads_c, grads_e):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert not counters["graph_break"]


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


@pytest.mark.slow
def test_compiled_pat_resumes_exactly_with_its_feedback(tmp_path):
    settings = {"num_train_epochs": 2, "save_strategy": "steps", "save_steps": 3}
    full = make_trainer(tmp_path / "full", "pat", compiled=True, **settings)
    full.train()
    part = make_trainer(tmp_path / "part", "pat", compiled=True, **settings)
    part.add_callback(StopAt(3))
    part.train()
    state = load_file(os.path.join(part.args.output_dir, "checkpoint-3", "distill_state.safetensors"))
    assert {f"__extra__.feedback.{i}" for i in range(4)} <= set(state)
    resumed = make_trainer(tmp_path / "part", "pat", compiled=True, **settings)
    resumed.train(resume_from_checkpoint=True)
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, full.model.state_dict()[key], rtol=0, atol=0, msg=key)
    for a, b in zip(resumed.method.feedback, full.method.feedback):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not counters["graph_break"]


@pytest.mark.parametrize("torch_compile", [False, True])
def test_a_compiled_student_is_accepted_and_exported_with_plain_keys(tmp_path, torch_compile):
    torch.manual_seed(0)
    plain = create_student("test_resnet", num_classes=3, img_size=20)
    student = torch.compile(plain, backend="eager")
    trainer = make_trainer(
        tmp_path, "kd", compiled=torch_compile, student=student, max_steps=2, save_strategy="steps", save_steps=2
    )
    wrapper = trainer.model
    assert wrapper.student is plain and wrapper.compiled_student is student
    assert not any("_orig_mod" in key for key in wrapper.state_dict())
    calls = []
    plain.register_forward_hook(lambda *_: calls.append(1))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    trainer.train()
    assert calls and any(not torch.equal(before[k], v) for k, v in plain.state_dict().items())
    trainer.save_model()
    for folder in (trainer.args.output_dir, os.path.join(trainer.args.output_dir, "checkpoint-2")):
        assert set(load_file(os.path.join(folder, "model.safetensors"))) == set(plain.state_dict())


def test_compile_options_follow_accelerates_plugin():
    from accelerate.utils import TorchDynamoPlugin

    assert compile_options(TorchDynamoPlugin(backend="no")) is None
    assert compile_options(TorchDynamoPlugin(backend="inductor")) == {"backend": "inductor"}
    options = compile_options(TorchDynamoPlugin(backend="aot_eager", mode="max-autotune", dynamic=True))
    assert options == {"backend": "aot_eager", "mode": "max-autotune", "dynamic": True}
