"""Generic stage sites: where any timm model's and any transformers classifier's stages are, found from their
public APIs instead of per-family code.

- timm: ``feature_info`` (module names, channels, reductions). Hierarchical models (several reductions): the last
  module per reduction, the deepest :data:`~.layout.NUM_STAGES`; isotropic models (one reduction): the blocks
  ending at the isotropic positions of the method (2/12, 4/12, 10/12, 12/12 of the depth). A stage's input is the
  input of its first ``feature_info`` module (a forward pre-hook).
- transformers: ``output_hidden_states=True``. One probe forward maps each hidden state to the module that
  produces it (forward hooks, matched by tensor identity, else by value); hierarchical models (hidden states of
  several grids) take the last hidden state per grid, the deepest 4; isotropic ones the isotropic positions. A
  stage's input is the hidden state before its first one, rewritten through a forward hook on its producer.

Layouts are found, not assumed: maps (B, C, H, W), NHWC maps (B, H, W, C), or tokens (B, P + H·W, C) whose
prefix count P (0, 1, 2, 5 all occur) is the token count less the patch grid's size.

Imports only :mod:`.layout` from the package; :mod:`.engine` builds on it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .layout import _ISOTROPIC_ENDS, NUM_STAGES, _group_ranges, _Layout, _Site

_MAX_PREFIX_TOKENS = 16


class NoStagesError(ValueError):
    """A model whose stage features cannot be found (no ``feature_info`` / hidden states usable as stages)."""


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _square_grid(num_tokens: int) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, grid) for tokens of a square input: the fewest prefix tokens leaving a square patch count."""
    for prefix in range(min(_MAX_PREFIX_TOKENS, num_tokens - 1) + 1):
        side = math.isqrt(num_tokens - prefix)
        if side * side == num_tokens - prefix and side > 0:
            return prefix, (side, side)
    return None


def _detect_layout(
    tensor: torch.Tensor,
    channels: int | None,
    grids: list[tuple[int, int]],
    image_size: tuple[int, int],
) -> tuple[_Layout, int, tuple[int, int] | None] | None:
    """(layout, prefix tokens, token grid) of a stage tensor, or None when it is no map or token sequence.

    Args:
        tensor: The tensor, batch first.
        channels: Its channel count when known (timm ``feature_info``), to tell NCHW from NHWC.
        grids: Candidate patch grids (from the reduction), tried first for tokens.
        image_size: The probe's input size; a square input lets a square grid be recovered from a token count.
    """
    if tensor.dim() == 4:
        _, d1, d2, d3 = tensor.shape
        if channels is not None and d3 == channels and d1 != channels:
            return "nhwc", 0, None
        if channels is not None and d1 != channels and d3 != channels:
            return None
        if channels is None and (d2, d3) not in grids and (d1, d2) in grids:
            return "nhwc", 0, None
        return "map", 0, None
    if tensor.dim() == 3:
        length = tensor.shape[1]
        if channels is not None and tensor.shape[2] != channels:
            return None
        for grid in grids:
            prefix = length - grid[0] * grid[1]
            if 0 <= prefix <= _MAX_PREFIX_TOKENS:
                return "tokens", prefix, grid
        if image_size[0] == image_size[1]:
            found = _square_grid(length)
            if found is not None:
                return "tokens", found[0], found[1]
    return None


def _reduction_grids(image_size: tuple[int, int], reduction: int) -> list[tuple[int, int]]:
    height, width = image_size
    grids = [(math.ceil(height / reduction), math.ceil(width / reduction)), (height // reduction, width // reduction)]
    return list(dict.fromkeys(g for g in grids if g[0] > 0 and g[1] > 0))


def _isotropic_ends(num_units: int) -> list[int]:
    """0-based indices of the units ending the stages of an isotropic model (distinct, in order)."""
    stops = [stop for _, stop in _group_ranges(num_units, _ISOTROPIC_ENDS)]
    return sorted({stop - 1 for stop in stops})


def _probe(model: nn.Module, modules: list[nn.Module], call: Any) -> tuple[dict[int, Any], dict[int, Any], Any]:
    """Runs ``call()`` once (no grad, eval mode) with hooks recording each module's first input and its output."""
    inputs: dict[int, Any] = {}
    outputs: dict[int, Any] = {}
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(module) not in inputs:
            inputs[id(module)] = args[0] if args else next(iter(kwargs.values()), None)

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        outputs[id(module)] = output

    for module in modules:
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            result = call()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return inputs, outputs, result


def _probe_input(model: nn.Module, image_size: tuple[int, int], in_channels: int) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    # Random, not zeros: hidden states are also matched by value, which zeros would make ambiguous.
    return torch.rand(1, in_channels, *image_size, generator=generator).to(device=device, dtype=dtype)


# ---- timm -----------------------------------------------------------------------------------------------------


def timm_generic_sites(model: nn.Module, image_size: tuple[int, int], in_channels: int) -> list[_Site]:
    """Stage sites of any timm model, from its ``feature_info``.

    Raises:
        NoStagesError: No ``feature_info``, or none of its modules gives a map or token feature.
    """
    name = type(model).__name__
    info = getattr(model, "feature_info", None)
    entries = []
    for item in info or []:
        if not isinstance(item, dict) or "module" not in item:
            continue
        try:
            module = model.get_submodule(str(item["module"]))
        except AttributeError:
            continue
        first = module
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            # A list is never called, and timm's gradient checkpointing runs a Sequential's children without it
            # (checkpoint_seq(..., flatten=True)): its first and last modules carry the hooks instead.
            if not len(module):
                continue
            first, module = module[0], module[-1]
        entries.append((first, module, int(item.get("num_chs", 0)) or None, int(item.get("reduction", 1))))
    if not entries:
        raise NoStagesError(f"{name}: its feature_info names no module of the model to read a stage from")
    modules = list(dict.fromkeys(m for first, last, _, _ in entries for m in (first, last)))
    inputs, outputs, _ = _probe(model, modules, lambda: model(_probe_input(model, image_size, in_channels)))

    usable = []  # (entry index, layout, prefix, grid)
    for index, (_, module, channels, reduction) in enumerate(entries):
        tensor = _first_tensor(outputs.get(id(module)))
        if tensor is None:
            continue
        grids = _reduction_grids(image_size, reduction)
        patch_grid = _patch_grid(model, image_size)
        if patch_grid is not None and patch_grid not in grids:
            grids.append(patch_grid)
        layout = _detect_layout(tensor, channels, grids, image_size)
        if layout is not None:
            usable.append((index, *layout))
    if not usable:
        raise NoStagesError(f"{name}: none of its feature_info modules gives a map or token feature")

    reductions = {entries[i][3] for i, *_ in usable}
    if len(reductions) > 1:
        # Hierarchical: the last usable module per reduction (consecutive runs), the deepest ones.
        chosen = []
        for position, item in enumerate(usable):
            following = usable[position + 1] if position + 1 < len(usable) else None
            if following is None or entries[following[0]][3] != entries[item[0]][3]:
                chosen.append(item)
        firsts = {}
        for item in usable:
            firsts.setdefault(entries[item[0]][3], item)
        chosen = chosen[-NUM_STAGES:]
        starts = [firsts[entries[item[0]][3]] for item in chosen]
    else:
        ends = _isotropic_ends(len(usable))
        chosen = [usable[i] for i in ends]
        starts = [usable[0]] + [usable[i + 1] for i in ends[:-1]]
    sites = []
    for position, ((index, layout, prefix, grid), (start_index, *_)) in enumerate(zip(chosen, starts)):
        site = _Site(None, entries[index][1], layout, prefix, grid)
        if position:
            # The stage's input is the previous stage's output: rewritten by a forward hook on that module, in
            # its (known) layout, so the prompt sees the whole stage, downsampling included.
            previous_index, *previous_layout = chosen[position - 1]
            site.in_module, site.in_hook = entries[previous_index][1], "post"
            site.in_layout, site.in_prefix_tokens, site.in_grid = previous_layout
        else:
            in_module = entries[start_index][0]
            in_layout = _input_layout(inputs.get(id(in_module)), layout, entries[start_index][3], model, image_size)
            if in_layout is not None:
                site.in_module = in_module
                site.in_layout, site.in_prefix_tokens, site.in_grid = in_layout
        sites.append(site)
    return sites


def _input_layout(
    value: Any, output_layout: _Layout, reduction: int, model: nn.Module, image_size: tuple[int, int]
) -> tuple[_Layout, int, tuple[int, int] | None] | None:
    """The layout of the first stage's input (a pre-hook's first argument), or None when it is no tensor."""
    if not isinstance(value, torch.Tensor) or value.dim() not in (3, 4):
        return None
    if value.dim() == 4:
        # A stage whose output is NHWC (timm Swin) takes NHWC input.
        return ("nhwc", 0, None) if output_layout == "nhwc" else ("map", 0, None)
    grids = _reduction_grids(image_size, reduction)
    patch_grid = _patch_grid(model, image_size)
    if patch_grid is not None:
        grids.insert(0, patch_grid)
    return _detect_layout(value, int(value.shape[-1]), grids, image_size)


def _patch_grid(model: nn.Module, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """The patch grid of a timm model's patch embedding at ``image_size`` (its stride, read from the module)."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None:
        return None
    if hasattr(patch_embed, "dynamic_feat_size"):
        try:
            grid = patch_embed.dynamic_feat_size(image_size)
            return int(grid[0]), int(grid[1])
        except Exception:
            pass
    stride = patch_stride(patch_embed)
    if stride is None:
        return None
    return image_size[0] // stride[0], image_size[1] // stride[1]


def patch_stride(module: nn.Module) -> tuple[int, int] | None:
    """The stride of a patch embedding: its convolution's stride, not its kernel (PVT-v2: kernel 7, stride 4).

    The product of the strides of its convolutions, for embeddings made of a few stacked ones; None without any.
    """
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return None
    height = width = 1
    for conv in convs:
        height, width = height * int(conv.stride[0]), width * int(conv.stride[1])
    return height, width


# ---- transformers ---------------------------------------------------------------------------------------------


def hf_generic_sites(model: nn.Module, image_size: tuple[int, int], in_channels: int) -> list[_Site]:
    """Stage sites of any transformers image classifier, from ``output_hidden_states=True``.

    Raises:
        NoStagesError: The forward gives no hidden states, or none usable as a stage.
    """
    name = type(model).__name__
    modules = [module for module in model.modules() if module is not model]
    pixels = _probe_input(model, image_size, in_channels)
    _, outputs, result = _probe(model, modules, lambda: model(pixel_values=pixels, output_hidden_states=True))
    hidden = getattr(result, "hidden_states", None)
    if not hidden or len(hidden) < 2:
        raise NoStagesError(f"{name}: its forward gives no hidden states (output_hidden_states=True)")

    by_identity: dict[int, nn.Module] = {}
    for module in modules:  # model.modules() is pre-order: inner modules come later, outer ones win below
        tensor = _first_tensor(outputs.get(id(module)))
        if tensor is not None and id(tensor) not in by_identity:
            by_identity[id(tensor)] = module

    def producer(tensor: torch.Tensor) -> nn.Module | None:
        module = by_identity.get(id(tensor))
        if module is not None:
            return module
        # No module returned this very tensor (a copy after it): the outermost one with equal values.
        for candidate in modules:
            value = _first_tensor(outputs.get(id(candidate)))
            if value is not None and value.shape == tensor.shape and torch.equal(value, tensor):
                return candidate
        return None

    def token_producer(tensor: torch.Tensor) -> nn.Module | None:
        # A map hidden state reshaped from a module's (B, H·W, C) tokens after it (PVT-v2, SegFormer).
        if tensor.dim() != 4:
            return None
        tokens = tensor.flatten(2).transpose(1, 2)
        for candidate in reversed(modules):  # the innermost last module: the stage's final norm
            value = _first_tensor(outputs.get(id(candidate)))
            if value is not None and value.shape == tokens.shape and torch.equal(value, tokens):
                return candidate
        return None

    described = []  # (index, producer, layout, prefix, grid, spatial key)
    for index, tensor in enumerate(hidden):
        module = producer(tensor)
        layout = _detect_layout(tensor, None, [], image_size) if module is not None else None
        if module is None and (module := token_producer(tensor)) is not None:
            layout = ("tokens", 0, (int(tensor.shape[2]), int(tensor.shape[3])))
        if layout is None:
            continue
        kind, prefix, grid = layout
        key = (grid[0] * grid[1],) if grid is not None else (tensor.shape[2] * tensor.shape[3],)
        described.append((index, module, kind, prefix, grid, key))
    keys = {d[5] for d in described if d[0] > 0}
    # Isotropic models: the first hidden state is the embedding's output, the input of the first block. In
    # hierarchical ones it may be the first stage's own output (SegFormer, PVT-v2, MobileViT): a candidate too.
    stage_candidates = [d for d in described if d[0] > 0 or len(keys) > 1]
    if not stage_candidates:
        raise NoStagesError(f"{name}: none of its hidden states is a map or token sequence read from a module")
    runs: list[list[tuple]] = []  # consecutive hidden states of one grid (hierarchical) or one block group
    if len(keys) > 1:
        for item in stage_candidates:
            if runs and runs[-1][-1][5] == item[5]:
                runs[-1].append(item)
            else:
                runs.append([item])
        runs = runs[-NUM_STAGES:]
    else:
        start = 0
        for end in _isotropic_ends(len(stage_candidates)):
            runs.append(stage_candidates[start : end + 1])
            start = end + 1
    if len(keys) > 1 and len(runs[0]) > 1 and runs[0][0][0] == 0:
        # The embedding's output (hidden state 0) on the first stage's grid is that stage's input (ConvNeXt, BiT).
        runs[0] = runs[0][1:]
    sites = []
    for run in runs:
        _, module, kind, prefix, grid, _ = run[-1]
        # The stage's input: the hidden state just before the stage's first one (given by another module).
        before = [d for d in described if d[0] < run[0][0]]
        site = _Site(None, module, kind, prefix, grid)
        if before and before[-1][1] is not module:
            in_item = before[-1]
            site.in_module, site.in_hook = in_item[1], "post"
            site.in_layout, site.in_prefix_tokens, site.in_grid = in_item[2], in_item[3], in_item[4]
        sites.append(site)
    if len({id(site.out_module) for site in sites}) != len(sites):
        raise NoStagesError(f"{name}: its hidden states do not come from distinct modules")
    return sites
