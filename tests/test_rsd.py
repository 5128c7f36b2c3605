"""RSD (redundancy suppression distillation): the loss against a direct formula in float64, the AAD module's
shapes, its settings, a batch of one, mixed precision, Mixup targets, EMA and the export. Compile: test_compile;
the global batch under DDP: test_distributed."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from pat_hf import ImageView, PATDistillationTrainer, create_student, with_image_transforms
from pat_hf.losses import rsd_loss
from pat_hf.methods import DistillationBatch, Features, get_method
from pat_hf.methods.rsd import AADModule
from pat_hf.models.teacher import load_teacher
from support.tiny import make_image_dataset, tiny_args, tiny_teacher


def slow_rsd(student: torch.Tensor, teacher: torch.Tensor, kappa: float, eps: float = 1e-5) -> float:
    """The published formula, one scalar at a time in float64 (Python floats)."""
    s, t = student.double().tolist(), teacher.double().tolist()
    batch, dim = len(s), len(s[0])

    def standardised(x):
        columns = []
        for j in range(dim):
            column = [x[b][j] for b in range(batch)]
            mean = sum(column) / batch
            var = sum((v - mean) ** 2 for v in column) / batch
            columns.append([(v - mean) / math.sqrt(var + eps) for v in column])
        return columns  # [j][b]

    cs, ct = standardised(s), standardised(t)
    total = 0.0
    for i in range(dim):
        for j in range(dim):
            c = sum(cs[i][b] * ct[j][b] for b in range(batch)) / batch
            total += (1 - c) ** 2 if i == j else kappa * c**2
    return total / dim


@pytest.mark.parametrize("batch,dim,kappa", [(2, 3, 0.5), (7, 5, 0.2), (16, 4, 0.0), (5, 9, 1 / 9)])
def test_rsd_loss_equals_the_direct_formula_in_float64(batch, dim, kappa):
    generator = torch.Generator().manual_seed(batch * dim)
    student = torch.randn(batch, dim, generator=generator, dtype=torch.float64) * 3 + 1
    # A teacher correlated with the student, so the diagonal is far from 0 and 1.
    teacher = student @ torch.randn(dim, dim, generator=generator, dtype=torch.float64) + torch.randn(
        batch, dim, generator=generator, dtype=torch.float64
    )
    value = rsd_loss(student, teacher, kappa)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(slow_rsd(student, teacher, kappa), rel=1e-12, abs=1e-12)


def test_rsd_loss_minimum_gradients_and_float32():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator, dtype=torch.float64)
    # Identical up to a per-dimension affine map: C's diagonal is 1 (up to eps), the invariance term about 0; the
    # decorrelation term is the sample correlation between x's own columns.
    assert rsd_loss(3 * x + 2, x, kappa=0.0).item() < 1e-4
    own = torch.corrcoef(x.t())
    off = (own.square().sum() - own.diagonal().square().sum()) / 4
    assert rsd_loss(3 * x + 2, x, kappa=0.5).item() == pytest.approx(0.5 * off.item(), rel=1e-3)
    # Swapping two student dimensions breaks the invariance.
    assert rsd_loss(x[:, [1, 0, 2, 3]], x, kappa=0.0).item() > 0.4
    student = torch.randn(8, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(8, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: rsd_loss(s, teacher, 0.3), (student,))
    rsd_loss(student, teacher, 0.3).backward()
    assert teacher.grad is None  # the teacher is a target
    half = rsd_loss(student.detach().bfloat16(), teacher.detach().bfloat16(), 0.3)
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="at least 2"):
        rsd_loss(student[:1], teacher[:1], 0.3)
    with pytest.raises(ValueError, match="one shape"):
        rsd_loss(student, teacher[:, :3], 0.3)


def make(tmp_path, student=None, family="convnext", **overrides):
    student = student if student is not None else create_student("test_resnet", num_classes=3, img_size=20)
    teacher = load_teacher(tiny_teacher(family))
    args = tiny_args(tmp_path, distill_method="rsd", **overrides)
    return get_method("rsd")(args, student, teacher), student, teacher


@pytest.mark.parametrize(
    "student_name,kwargs,family",
    [
        ("test_resnet", {"img_size": 20}, "convnext"),
        ("test_vit", {"img_size": 16}, "vit"),
        ("test_convnext", {}, "swin"),
    ],
)
def test_aad_shapes_follow_both_models(tmp_path, student_name, kwargs, family):
    student = create_student(student_name, num_classes=3, **kwargs)
    method, _, teacher = make(tmp_path, student, family)
    d_s, d_t = student.num_features, teacher.model.config.num_labels
    d_t = method._teacher_reader.embedding.dim
    assert d_s == method._student_reader.embedding.dim
    first, norm, _, last = method.aad
    assert (first.in_features, first.out_features, norm.num_features) == (d_s, 4 * d_t, 4 * d_t)
    assert (last.in_features, last.out_features) == (4 * d_t, d_t)
    assert method.kappa == pytest.approx(1 / d_t)
    assert method.extra_parameters() == sum(p.numel() for p in method.aad.parameters())
    assert method.extra_parameters() == (d_s + 1) * 4 * d_t + 2 * 4 * d_t + (4 * d_t + 1) * d_t


@pytest.mark.parametrize("d_s,e,d_t", [(1, 1, 1), (96, 7, 768), (512, 3072, 10)])
def test_aad_module_maps_any_widths(d_s, e, d_t):
    out = AADModule(d_s, e, d_t)(torch.randn(3, d_s))
    assert out.shape == (3, d_t)


def test_settings_logits_variant_and_kappa_zero(tmp_path):
    method, *_ = make(tmp_path, rsd_target="logits", rsd_kappa=0.0, rsd_expander_dim=5, rsd_weight=2.0, kd_weight=0.5)
    first, _, _, last = method.aad
    assert (first.in_features, first.out_features, last.out_features) == (3, 5, 3)
    settings = method.settings()
    assert settings["rsd_kappa"] == 0.0 and settings["rsd_target"] == "logits" and settings["rsd_expander_dim"] == 5
    generator = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator), torch.arange(6) % 3
    out = method.compute_loss(Features(s), Features(t), y)
    expected_rsd = rsd_loss(method.aad(s), t, 0.0)
    torch.testing.assert_close(out.parts["rsd"], expected_rsd.detach())
    ce = torch.nn.functional.cross_entropy(s, y, label_smoothing=0.1)
    torch.testing.assert_close(out.loss, ce + 0.5 * 2.0 * expected_rsd, rtol=1e-5, atol=1e-6)
    assert set(out.parts) == {"ce", "rsd", "kd"}


def test_the_optional_kd_term(tmp_path):
    from pat_hf.losses import kl_div_loss

    method, *_ = make(tmp_path, rsd_target="logits", rsd_kd_weight=0.25, temperature=2.0, ce_weight=0.0)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    out = method.compute_loss(Features(s), Features(t), None)
    torch.testing.assert_close(out.loss, out.parts["rsd"] + 0.25 * kl_div_loss(s, t, 2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        ({"rsd_weight": -1.0}, "rsd_weight must be >= 0"),
        ({"rsd_kd_weight": float("inf")}, "rsd_kd_weight must be >= 0"),
        ({"rsd_kappa": float("nan")}, "rsd_kappa must be >= 0"),
        ({"rsd_expander_dim": 0}, "rsd_expander_dim must be an integer >= 1"),
        ({"rsd_target": "features"}, "rsd_target must be one of embedding, logits"),
    ],
)
def test_out_of_range_settings_are_refused(tmp_path, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_args(tmp_path, distill_method="rsd", **overrides)


def batch_for(student_size, teacher, n, labels=None):
    return DistillationBatch(torch.randn(n, 3, *student_size), labels, torch.randn(n, 3, *teacher.view.size))


def test_a_batch_of_one_trains_on_the_other_terms(tmp_path):
    """BatchNorm1d in training mode and a per-dimension std are undefined on one sample: the RSD term is 0 (with
    a zero gradient reaching every AAD parameter) and the CE still trains the student."""
    student = create_student("test_vit", num_classes=3, img_size=16)  # no BatchNorm of its own
    method, student, teacher = make(tmp_path, student)
    method.train()
    out = method(student, teacher, batch_for((16, 16), teacher, 1, torch.tensor([2])))
    assert out.parts["rsd"].item() == 0.0 and out.parts["ce"] > 0
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in method.aad.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_mixed_precision_and_soft_targets(tmp_path):
    method, student, teacher = make(tmp_path)
    soft = torch.softmax(torch.randn(4, 3), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(student, teacher, batch_for((20, 20), teacher, 4, soft))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(v.dtype == torch.float32 for v in out.parts.values())
    torch.testing.assert_close(
        out.parts["ce"], -(soft * torch.log_softmax(out.logits.float(), -1)).sum(-1).mean(), rtol=1e-5, atol=1e-6
    )
    out.loss.backward()
    assert method.aad[0].weight.grad.abs().sum() > 0


def test_trains_with_mixup_and_ema_and_exports_the_student_alone(tmp_path):
    torch.manual_seed(0)
    student = create_student("test_vit", num_classes=3, img_size=16)
    view = ImageView.from_timm(student)
    data = make_image_dataset(n=16)
    trainer = PATDistillationTrainer(
        model=student,
        teacher=tiny_teacher("convnext"),
        args=tiny_args(
            tmp_path,
            distill_method="rsd",
            max_steps=3,
            per_device_train_batch_size=4,
            mixup_alpha=0.8,
            model_ema=True,
            model_ema_decay=0.5,
            save_strategy="steps",
            save_steps=3,
        ),
        train_dataset=with_image_transforms(data, view, None, train=True),
        eval_dataset=with_image_transforms(data, view, None, train=False),
    )
    aad_before = {k: v.clone() for k, v in trainer.method.aad.state_dict().items()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss_rsd" in h]
    assert len(logged) == 3 and all(math.isfinite(h["loss_rsd"]) and h["loss_rsd"] > 0 for h in logged)
    assert not torch.equal(aad_before["0.weight"], trainer.method.aad[0].weight)
    metrics = trainer.evaluate()
    assert "eval_accuracy" in metrics
    # The AAD module is in the checkpoint's distillation state, never in the export.
    ckpt = os.path.join(trainer.args.output_dir, "checkpoint-3")
    state_files = [f for f in os.listdir(ckpt) if f.startswith("distill_state")]
    assert state_files and any("aad" in k for k in load_file(os.path.join(ckpt, state_files[0])))
    state = load_file(os.path.join(ckpt, "distill_state.safetensors"))
    assert set(state) == set(trainer.method.state_dict())
    manifest = json.load(open(os.path.join(ckpt, "distill_manifest.json")))
    assert manifest["method"]["rsd_kappa"] == pytest.approx(1 / 64) and manifest["method"]["rsd_expander_dim"] == 256
    trainer.save_model()
    exported = load_file(os.path.join(trainer.args.output_dir, "model.safetensors"))
    assert set(exported) == set(student.state_dict()) and not any("aad" in k for k in exported)
    # Resuming restores the AAD module (and its BatchNorm statistics) exactly.
    fresh = PATDistillationTrainer(
        model=create_student("test_vit", num_classes=3, img_size=16),
        teacher=tiny_teacher("convnext"),
        args=tiny_args(tmp_path / "fresh", distill_method="rsd", max_steps=3),
        train_dataset=with_image_transforms(data, view, None, train=True),
    )
    fresh._load_from_checkpoint(ckpt)
    for key, value in fresh.method.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from pat_hf.methods.rsd import all_gather_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = rank + 2  # unequal batches: 2 and 3 rows
        x = (torch.arange(rows * 3, dtype=torch.float32).view(rows, 3) + 100 * rank).requires_grad_(True)
        gathered = all_gather_rows(x)
        weights = torch.arange(15, dtype=torch.float32).view(5, 3)
        (gathered * weights).sum().backward()
        plain = all_gather_rows(x.detach())
        torch.save({"gathered": gathered.detach(), "grad": x.grad, "plain": plain}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_gather_rows_on_two_processes_with_unequal_batches(tmp_path):
    """The global batch RSD uses under DDP: rows of both processes in rank order (padding removed), and each
    process's rows get the gradient summed over the processes' (identical) losses: 2 × d(loss)/d(rows)."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expected = torch.cat([torch.arange(6.0).view(2, 3), torch.arange(9.0).view(3, 3) + 100])
    weights = torch.arange(15, dtype=torch.float32).view(5, 3)
    for rank, rows in ((0, slice(0, 2)), (1, slice(2, 5))):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["gathered"], expected)
        torch.testing.assert_close(result["plain"], expected)
        torch.testing.assert_close(result["grad"], 2 * weights[rows])
