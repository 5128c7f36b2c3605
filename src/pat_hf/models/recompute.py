"""Block-by-block recomputation of a frozen model's forward in the backward, through forward hooks.

PAT backpropagates through the whole (frozen) teacher to reach the prompts at its stage inputs, so autograd
keeps every activation of the prompted teacher pass: the largest part of PAT's peak memory. With
:class:`BlockRecompute` installed on the teacher's residual blocks, each block runs its forward without
autograd, keeps only its input, and is run again during the backward, one block at a time, to get the
gradient with respect to that input. Peak memory then holds the blocks' inputs plus one block's activations,
for the price of one more teacher forward.

Only public APIs are used (module hooks and ``torch.autograd.Function``); the model's classes and forwards are
left untouched. Nothing happens outside :meth:`BlockRecompute.active`, and inside it only for calls whose
inputs require a gradient (the blocks after the first prompt).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["BlockRecompute"]


def _is_float_tensor(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    if hasattr(torch, "get_autocast_dtype"):
        try:
            return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        except (TypeError, RuntimeError):  # a device type autocast does not know
            return False, None
    return False, None  # pragma: no cover - torch < 2.4


class _Call:
    """One recorded block call: the module, its arguments, and which of them are the gradient inputs."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.module = module
        self.args, self.kwargs = args, kwargs
        self.arg_slots = [i for i, a in enumerate(args) if _is_float_tensor(a) and a.requires_grad]
        self.kwarg_slots = [k for k, v in kwargs.items() if _is_float_tensor(v) and v.requires_grad]
        self.inputs = [args[i] for i in self.arg_slots] + [kwargs[k] for k in self.kwarg_slots]
        device_type = self.inputs[0].device.type if self.inputs else "cpu"
        self.device_type = device_type
        self.autocast = _autocast_state(device_type)
        self.grad_mode = torch.is_grad_enabled()

    def rerun(self, inputs: Sequence[torch.Tensor]) -> Any:
        """The block's forward again, on ``inputs`` in place of the recorded gradient inputs (hooks skipped:
        the recorded arguments are already what the hooks made of them)."""
        args = list(self.args)
        kwargs = dict(self.kwargs)
        for slot, value in zip(self.arg_slots, inputs):
            args[slot] = value
        for key, value in zip(self.kwarg_slots, inputs[len(self.arg_slots) :]):
            kwargs[key] = value
        enabled, dtype = self.autocast
        context = torch.autocast(self.device_type, dtype=dtype) if enabled else contextlib.nullcontext()
        with context:
            return self.module.forward(*args, **kwargs)


def _flatten(output: Any) -> tuple[list[torch.Tensor], Any] | None:
    """The floating-point tensors of a block output (a tensor, or a tuple/list of tensors and other values)
    and a function putting replacements back; None for any other structure."""
    if isinstance(output, torch.Tensor):
        return ([output], lambda tensors: tensors[0]) if output.is_floating_point() else None
    if isinstance(output, (tuple, list)) and type(output) in (tuple, list):
        slots = [i for i, o in enumerate(output) if _is_float_tensor(o)]
        if not slots:
            return None

        def rebuild(tensors: Sequence[torch.Tensor]) -> Any:
            items = list(output)
            for slot, tensor in zip(slots, tensors):
                items[slot] = tensor
            return type(output)(items)

        return [output[i] for i in slots], rebuild
    return None


class _Recompute(torch.autograd.Function):
    """Connects a block's no-grad outputs to its gradient inputs; the backward reruns the block."""

    @staticmethod
    def forward(ctx: Any, call: _Call, num_inputs: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.call = call
        ctx.save_for_backward(*tensors[:num_inputs])
        ctx.num_outputs = len(tensors) - num_inputs
        # New tensor objects sharing the outputs' storage: autograd attaches them to this node.
        return tuple(t.view_as(t) for t in tensors[num_inputs:])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            flat = _flatten(ctx.call.rerun(inputs))
        assert flat is not None  # the same structure as in the forward
        outputs = flat[0]
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        if pairs:
            input_grads = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
        else:
            input_grads = (None,) * len(inputs)
        ctx.call = None  # drop the recorded arguments as soon as this block is done
        return (None, None, *input_grads, *([None] * ctx.num_outputs))


_ALWAYS_CALL = "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters


class BlockRecompute:
    """Forward hooks that make the given blocks recompute their forward in the backward.

    Args:
        blocks: Modules, in any order, none inside another; their parameters must not require a gradient
            (only the gradient with respect to their inputs is computed).

    Use :meth:`active` around the forward that should save memory: the hooks are installed on entry and taken off
    on exit.
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        trainable = [name for block in blocks for name, p in block.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"block recomputation only computes input gradients, but these parameters require a gradient: "
                f"{trainable[:3]}{' ...' if len(trainable) > 3 else ''} (freeze the model first)"
            )
        self._blocks = list(blocks)
        self._active = False
        self._pending: dict[int, list[_Call | None]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Blocks called inside recompute in the backward (when grad mode is on and their input needs a grad).

        The hooks exist only inside this block: outside it the blocks carry none of them, so a compiled forward of
        the same model (a plain teacher pass) neither traces them nor recompiles when they come and go.
        """
        if self._active:  # nested: the hooks are already on
            yield
            return
        self._install()
        self._active = True
        try:
            yield
        finally:
            self._active = False
            self.remove()

    def _install(self) -> None:
        ref = weakref.ref(self)
        extra = {"always_call": True} if _ALWAYS_CALL else {}
        for block in self._blocks:
            # Registered after the stage taps' pre-hooks, so the recorded arguments include the prompts; the
            # post-hook goes first, so the taps capture the re-attached outputs.
            self._handles.append(block.register_forward_pre_hook(_pre_hook(ref), with_kwargs=True))
            self._handles.append(block.register_forward_hook(_post_hook(ref), prepend=True, **extra))

    def remove(self) -> None:
        """Takes the hooks off (they are only on inside :meth:`active`). Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = None
        if self._active and torch.is_grad_enabled():
            candidate = _Call(module, args, kwargs)
            if candidate.inputs:
                call = candidate
                torch.set_grad_enabled(False)
        self._pending.setdefault(id(module), []).append(call)

    def _exit(self, module: nn.Module, output: Any) -> Any:
        stack = self._pending.get(id(module))
        call = stack.pop() if stack else None
        if call is None:
            return None
        torch.set_grad_enabled(call.grad_mode)
        if output is None:  # the forward raised (the hook is always called): let the error through
            return None
        flat = _flatten(output)
        if flat is None:
            # An output structure this wrapper cannot rebuild: run the block again with autograd, as usual.
            with torch.enable_grad():
                return call.rerun(call.inputs)
        tensors, rebuild = flat
        return rebuild(list(_Recompute.apply(call, len(call.inputs), *call.inputs, *tensors)))


def _pre_hook(ref: weakref.ref) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        owner = ref()
        if owner is not None:
            owner._enter(module, args, kwargs)

    return hook


def _post_hook(ref: weakref.ref) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        owner = ref()
        return owner._exit(module, output) if owner is not None else None

    return hook
