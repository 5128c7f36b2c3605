"""BlockRecompute: block-by-block recomputation of a frozen model in the backward, through hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pat_hf.models.recompute import BlockRecompute


class TupleBlock(nn.Module):
    """A residual block returning (hidden, aux) as older transformers layers do, with a non-tensor kwarg."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, str]:
        return x + scale * self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))), "aux"


class DictBlock(TupleBlock):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"hidden": super().forward(x, scale)[0]}


class Net(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 3, block: type[nn.Module] = TupleBlock) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(block(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(x, scale=0.5)
            x = out["hidden"] if isinstance(out, dict) else out[0]
        return x


def frozen(net: nn.Module) -> nn.Module:
    return net.requires_grad_(False).eval()


def run(net: Net, prompt: nn.Parameter, recompute: BlockRecompute | None, saved: list[int] | None = None):
    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(0))

    def pack(tensor):
        if saved is not None and not isinstance(tensor, nn.Parameter):
            saved.append(tensor.numel())
        return tensor

    context = recompute.active() if recompute is not None else torch.enable_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        out = net(x + prompt)
    (out.square().mean()).backward()
    grad = prompt.grad.clone()
    prompt.grad = None
    return out.detach(), grad


@pytest.mark.parametrize("block", [TupleBlock, DictBlock])
def test_recomputed_gradients_equal_the_plain_ones_and_only_block_inputs_are_kept(block):
    torch.manual_seed(0)
    net = frozen(Net(block=block))
    prompt = nn.Parameter(torch.randn(16) * 0.1)
    saved_plain: list[int] = []
    out_plain, grad_plain = run(net, prompt, None, saved_plain)
    recompute = BlockRecompute(list(net.blocks))
    saved: list[int] = []
    out, grad = run(net, prompt, recompute, saved)
    torch.testing.assert_close(out, out_plain, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_plain, rtol=1e-6, atol=1e-7)
    if block is TupleBlock:
        # One (4, 10, 16) input per block instead of every LayerNorm / Linear / GELU activation.
        assert saved == [4 * 10 * 16] * 3
        assert sum(saved_plain) > 5 * sum(saved)
    else:  # an output structure it cannot rebuild: those blocks keep their activations, gradients still exact
        assert sum(saved) == sum(saved_plain)
    # Inactive (or without grad) the hooks do nothing; removed, they are gone.
    with torch.no_grad(), recompute.active():
        torch.testing.assert_close(net(torch.ones(1, 10, 16)), net(torch.ones(1, 10, 16)))
    recompute.remove()
    saved_after: list[int] = []
    run(net, prompt, None, saved_after)
    assert saved_after == saved_plain


def test_recompute_keeps_autocast_and_refuses_trainable_blocks():
    torch.manual_seed(0)
    net = frozen(Net())
    prompt = nn.Parameter(torch.randn(16) * 0.1)
    x = torch.randn(2, 10, 16)
    grads = []
    for recompute in (None, BlockRecompute(list(net.blocks))):
        context = recompute.active() if recompute is not None else torch.enable_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), context:
            out = net(x + prompt)
        out.float().square().mean().backward()
        grads.append(prompt.grad.clone())
        prompt.grad = None
    # The backward reran the blocks under the same bf16 autocast: the same rounding, bit-identical gradients
    # (a float32 rerun would differ at the 1e-3 level).
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="freeze the model first"):
        BlockRecompute([nn.Linear(2, 2)])


def test_grad_mode_is_restored_when_a_block_raises():
    net = frozen(Net())
    recompute = BlockRecompute(list(net.blocks))
    prompt = nn.Parameter(torch.zeros(16))
    with pytest.raises(RuntimeError), recompute.active():
        net(torch.randn(2, 10, 8) + prompt.sum())  # wrong width: LayerNorm raises inside the first block
    assert torch.is_grad_enabled()


def test_hooks_exist_only_inside_active():
    """Outside active() the blocks carry no hook of it: a compiled forward of the same model (PAT's plain teacher
    pass) neither traces them nor recompiles when they come and go."""
    net = frozen(Net())
    recompute = BlockRecompute(list(net.blocks))

    def hook_counts():
        return [len(b._forward_pre_hooks) + len(b._forward_hooks) for b in net.blocks]

    assert hook_counts() == [0, 0, 0]
    with recompute.active():
        assert hook_counts() == [2, 2, 2]
        with recompute.active():  # nested: installed once
            assert hook_counts() == [2, 2, 2]
        assert hook_counts() == [2, 2, 2]
    assert hook_counts() == [0, 0, 0]
