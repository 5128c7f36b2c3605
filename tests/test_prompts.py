"""PAT's prompt block: the closed form equals the plain convolutional block (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_hf.methods.pat.prompts import AdaptiveFeedbackPrompt, region_sums


def reference_prompt(block: AdaptiveFeedbackPrompt, x: torch.Tensor, feedback: torch.Tensor | None) -> torch.Tensor:
    """The block as the paper writes it: every convolution run over the full map (kept here as the oracle)."""
    source = x
    if feedback is not None:
        u = block.fuse_mix(block.fuse_spatial(block.fuse_in(torch.cat([x, feedback], 1))))
        source = block.fuse_out(block.fuse_se(u))
    u = block.prompt_mix(block.prompt_spatial(block.prompt_in(source)))
    return block.prompt_out(block.prompt_se(u))


def randomise(block: nn.Module) -> None:
    torch.manual_seed(3)
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)


def token_grid(batch: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """A channels-last (B, C, H, W) view of (B, H·W, C) tokens, as the taps hand a token teacher's grid over."""
    tokens = torch.randn(batch, size[0] * size[1], channels, dtype=torch.float64)
    return tokens.transpose(1, 2).reshape(batch, channels, *size)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 5), (7, 7), (8, 6), (14, 14)])
@pytest.mark.parametrize("with_feedback", [False, True])
@pytest.mark.parametrize("layout", ["maps", "tokens"])
def test_closed_form_matches_convolutions(size, with_feedback, layout):
    block = AdaptiveFeedbackPrompt(8).double()
    randomise(block)
    if layout == "tokens":
        x = token_grid(3, 8, size).requires_grad_(True)
        assert x.stride(1) == 1 and (not x.is_contiguous() or size == (1, 1))  # the channels-last path
    else:
        x = torch.randn(3, 8, *size, dtype=torch.float64, requires_grad=True)
    fb = torch.randn(3, 8, *size, dtype=torch.float64, requires_grad=True) if with_feedback else None
    fast = block.prompt(x, fb)
    slow = reference_prompt(block, x, fb)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    # Gradients w.r.t. inputs and every parameter agree too.
    weights = torch.randn_like(fast)
    inputs = [x] + ([fb] if fb is not None else [])
    params = [p for p in block.parameters() if p is not block.beta]
    g_fast = torch.autograd.grad((fast * weights).sum(), inputs + params, allow_unused=True)
    g_slow = torch.autograd.grad((slow * weights).sum(), inputs + params, allow_unused=True)
    for a, b in zip(g_fast, g_slow):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_closed_form_in_float32_is_close():
    block = AdaptiveFeedbackPrompt(16)
    x = torch.randn(2, 16, 13, 11)
    torch.testing.assert_close(block.prompt(x), reference_prompt(block, x, None), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["maps", "tokens"])
def test_region_sums_against_explicit_loops(layout):
    x = token_grid(2, 3, (4, 6)) if layout == "tokens" else torch.randn(2, 3, 4, 6, dtype=torch.float64)
    sums, counts = region_sums(x)
    for i in range(5):
        for j in range(5):
            di, dj = i - 2, j - 2
            rows = range(max(0, di), 4 + min(0, di))
            cols = range(max(0, dj), 6 + min(0, dj))
            expected = (
                sum(x[:, :, r, c] for r in rows for c in cols)
                if len(rows) and len(cols)
                else torch.zeros(2, 3, dtype=torch.float64)
            )
            torch.testing.assert_close(sums[:, :, i, j], expected)
            assert counts[i, j] == len(rows) * len(cols)


def test_beta_zero_is_identity_and_beta_learns():
    block = AdaptiveFeedbackPrompt(8)
    x = torch.randn(2, 8, 5, 5)
    fb = torch.randn(2, 8, 5, 5)
    assert torch.equal(block(x, fb), x)
    out = block(x, fb)
    out.pow(2).sum().backward()
    assert block.beta.grad is not None and block.beta.grad.abs() > 0


def test_prompt_is_a_per_channel_offset():
    block = AdaptiveFeedbackPrompt(8)
    with torch.no_grad():
        block.beta.fill_(1.0)
    x = torch.randn(2, 8, 6, 6)
    delta = block(x) - x
    torch.testing.assert_close(delta, delta[:, :, :1, :1].expand_as(delta))


def test_without_feedback_branch_ignores_feedback():
    block = AdaptiveFeedbackPrompt(8, feedback=False)
    assert not block.has_feedback_branch
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block.prompt(x, torch.randn_like(x)), block.prompt(x))
    with pytest.raises(ValueError, match="divide by 4"):
        AdaptiveFeedbackPrompt(6)


def test_spatial_variant_varies_over_space():
    block = AdaptiveFeedbackPrompt(8, spatial=True)
    out = block.prompt(torch.randn(2, 8, 6, 6))
    assert out.shape == (2, 8, 6, 6) and out.std(dim=(2, 3)).mean() > 0


@pytest.mark.parametrize(
    "small,size", [((4, 4), (56, 56)), ((4, 4), (8, 12)), ((4, 4), (14, 14)), ((28, 28), (56, 56))]
)
def test_projecting_before_nearest_upsampling_is_exact(small, size):
    from pat_hf.methods.pat.heads import upsample_then_project

    torch.manual_seed(0)
    norm, proj = nn.BatchNorm2d(16).double(), nn.Conv2d(16, 8, 1).double()
    x = torch.randn(3, 16, *small, dtype=torch.float64, requires_grad=True)
    fast = upsample_then_project(x, size, norm, proj)
    reference = proj(norm(torch.nn.functional.interpolate(x, size=size, mode="nearest")))
    torch.testing.assert_close(fast, reference)
    weights = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * weights).sum(), [x, *norm.parameters(), *proj.parameters()])
    g_ref = torch.autograd.grad((reference * weights).sum(), [x, *norm.parameters(), *proj.parameters()])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)
