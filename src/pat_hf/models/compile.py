"""``torch.compile`` by regions: what ``torch_compile=True`` does in pat_hf.

transformers' Trainer hands ``torch_compile`` to Accelerate, which would compile the whole trainable wrapper as
one function. pat_hf compiles pieces instead (:class:`CompileMixin` takes the request from Accelerate and gives
it to the methods): each method runs its step as eager Python that calls compiled *regions*, plain functions of
modules and tensors (the student's forward, the plain teacher pass, PAT's prompted teacher pass with its
prompts, the heads, the losses). What is stateful or not traceable stays between the regions, in eager code:
the taps' capture lists, the prompt transforms being switched on and off, PAT's feedback state and the
block-by-block recomputation of ``pat_checkpoint_teacher``. So every region traces into one graph (no graph
break) and the passes keep the order chosen for peak memory (each region is one autograd node).

Recompiles stay bounded: each region is its own function (its own code object, so its own cache and
recompile limit), and a batch of another size (an epoch's last) recompiles a region once, with the batch
dimension dynamic (torch's automatic dynamic shapes); later short batches reuse that graph and full batches
keep their static one. Nothing is padded or skipped, so compiled training computes what eager training does.

Public helpers: :func:`compile_region` (one region), :func:`unwrap_compiled` (a module out of its
``torch.compile`` wrapper) and :func:`compile_options` (the options Accelerate would have used).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CompileMixin", "compile_options", "compile_region", "is_compiled_module", "unwrap_compiled"]

logger = logging.getLogger(__name__)


def is_compiled_module(module: Any) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile(module)`` returns (an ``OptimizedModule``)."""
    return isinstance(module, nn.Module) and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s wrapper (nested wrappers too); any other module unchanged."""
    while is_compiled_module(module):
        module = module._orig_mod
    return module


def compile_region(fn: Callable, options: dict[str, Any]) -> Callable:
    """``torch.compile(fn, **options)``: one region. ``fn`` must be a function of its own (not shared with another
    region), since torch caches compiled graphs, and counts recompiles, per code object."""
    return torch.compile(fn, **options)


def compile_options(plugin: Any) -> dict[str, Any] | None:
    """The ``torch.compile`` options of an Accelerate ``TorchDynamoPlugin``, or None when it compiles nothing."""
    backend = getattr(plugin, "backend", None)
    name = str(getattr(backend, "value", backend) or "no").lower()
    if name == "no":
        return None
    options: dict[str, Any] = {"backend": name}
    mode = getattr(plugin, "mode", None)
    if mode and mode != "default":
        options["mode"] = mode
    if getattr(plugin, "fullgraph", False):
        options["fullgraph"] = True
    if getattr(plugin, "dynamic", None) is not None:
        options["dynamic"] = plugin.dynamic
    return options


class CompileMixin:
    """Region compilation for :class:`pat_hf.PATDistillationTrainer` (mixed in before ``Trainer``).

    ``torch_compile`` / ``torch_compile_backend`` / ``torch_compile_mode`` (or ``accelerate launch
    --dynamo_backend``) reach Accelerate as a ``TorchDynamoPlugin``; this mixin takes its options and leaves
    Accelerate a plugin that compiles nothing, so the wrapper is prepared (devices, DDP, autocast) as usual and
    its methods compile their own regions. The one override of a private ``Trainer`` method outside
    ``checkpointing.py`` and ``hub_push.py``: ``_build_accelerator_args`` (transformers 5.x).
    """

    _region_compile_options: dict[str, Any] | None = None

    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        args = super()._build_accelerator_args(**kwargs)
        options = compile_options(args.get("dynamo_plugin"))
        if options is not None:
            from accelerate.utils import TorchDynamoPlugin

            self._region_compile_options = options
            args["dynamo_plugin"] = TorchDynamoPlugin(backend="no")
        return args

    def _compile_regions(self) -> None:
        """Gives the compile options to the wrapper (called once the accelerator exists). With a transformers
        that builds Accelerate's plugin elsewhere, Accelerate compiles the whole wrapper itself, as before."""
        options = self._region_compile_options
        if options is not None:
            logger.info("torch.compile by regions with %s.", options)
            self.accelerator.unwrap_model(self.model).compile_regions(options)
