"""The penultimate-embedding tap: the input of a classifier's final layer, for any timm or transformers model.

The penultimate embedding is what the classifier's last layer reads (timm's ``forward_head(pre_logits=True)``:
the pooled, normalised features; a transformers classifier's ``classifier`` input: the cls token after the final
norm, or the pooled map). It is read with a forward PRE-hook on the module that produces the logits, so no
model's forward is rewritten:

- a timm model: ``get_classifier()`` when it is a module with parameters (for timm's distilled DeiT, whose
  classifier is the pair ``(head, head_dist)``, the cls token's ``head``);
- anything else (a transformers classifier, TimmWrapper, a timm model whose classifier is not a module): the
  module is found by a probe forward, as the innermost module whose output IS the model's logits (the final
  ``Linear``: ``classifier`` of ViT / DeiT / Swin / ConvNeXt, ``classifier[1]`` of ResNet, the timm model's own
  head inside TimmWrapper). No table of model types: the probe follows the computation.

The same probe forward measures the embedding's dimension. During training the classifier's input includes the
head's dropout when the model has one (timm applies ``drop_rate`` between the pre-logits and the final layer);
in eval mode the tap equals ``forward_head(pre_logits=True)`` exactly.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

__all__ = ["EmbeddingTap", "build_embedding_tap", "find_classifier"]


def _as_embedding(x: torch.Tensor) -> torch.Tensor:
    """The classifier input as (B, D): a (B, D, 1, 1) map (a 1×1-convolution classifier) is flattened."""
    if x.dim() == 4 and x.shape[-2:] == (1, 1):
        return x.flatten(1)
    if x.dim() != 2:
        raise ValueError(
            f"the classifier's input has shape {tuple(x.shape)}; a penultimate embedding is (B, D) (or (B, D, 1, 1))"
        )
    return x


def _has_parameters(module: object) -> bool:
    return isinstance(module, nn.Module) and next(module.parameters(), None) is not None


def _is_transformers(model: nn.Module) -> bool:
    return isinstance(model, PreTrainedModel)


def _dummy_input(model: nn.Module, image_size: tuple[int, int]) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    config = getattr(model, "config", None)
    channels = int(getattr(config, "num_channels", 0) or getattr(model, "in_chans", 0) or 3)
    # Random (from a private generator: the global RNG is left alone), not zeros: on a constant input every head
    # of a freshly initialised model can output the same zeros, and the probe would match the wrong module.
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, channels, *image_size, generator=generator).to(device=device, dtype=dtype)


def _logits_of(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    if _is_transformers(model):
        out = model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out[0]
    out = model(pixel_values)
    return out[0] if isinstance(out, (tuple, list)) else out


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no batch-statistics update) and no grad; every module's flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _default_image_size(model: nn.Module) -> tuple[int, int]:
    inner = getattr(model, "timm_model", model)
    for embed_name in ("patch_embed", "stem"):
        img_size = getattr(getattr(inner, embed_name, None), "img_size", None)
        if img_size is not None:
            return _pair(img_size)
    input_size = (getattr(inner, "pretrained_cfg", None) or {}).get("input_size")
    if input_size is not None:
        return int(input_size[-2]), int(input_size[-1])
    config_size = getattr(getattr(model, "config", None), "image_size", None)
    return _pair(config_size) if config_size is not None else (224, 224)


def find_classifier(model: nn.Module, image_size: tuple[int, int] | None = None) -> tuple[str, nn.Module]:
    """The module whose input is the penultimate embedding, and its qualified name in ``model``.

    Args:
        model: A timm model or a transformers image classifier (TimmWrapper included).
        image_size: Input size of the probe forward (default: the model's own, else 224).

    Returns:
        ``(name, module)``.

    Raises:
        ValueError: No single module produces the logits (e.g. a model averaging two heads), naming the model.
    """
    names = {module: name for name, module in model.named_modules()}
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm: the model says which module its head's last layer is
        classifier = get_classifier()
        if isinstance(classifier, (tuple, list)) and classifier:  # distilled DeiT: (head, head_dist)
            classifier = classifier[0]
        if _has_parameters(classifier) and classifier in names:
            return names[classifier], classifier
    # The probe: every module's output in completion order; the first (innermost) one that is the logits wins.
    finished: list[tuple[nn.Module, torch.Tensor]] = []

    def record(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            finished.append((module, output))

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        size = image_size or _default_image_size(model)
        with _eval_no_grad(model):
            logits = _logits_of(model, _dummy_input(model, size))
    finally:
        for handle in handles:
            handle.remove()
    for module, output in finished:
        if _has_parameters(module) and output.shape == logits.shape and torch.equal(output, logits):
            return names[module], module
    raise ValueError(
        f"{type(model).__name__}: no module produces the logits by itself (a model combining several heads?), so "
        "its penultimate embedding cannot be read; use a model with a single classifier layer."
    )


class EmbeddingTap:
    """A forward pre-hook reading a model's penultimate embedding (the input of its final classifier layer).

    Build it with :func:`build_embedding_tap`. Like the stage taps, the hook holds weak references only and does
    nothing when fired on another module, so a ``copy.deepcopy`` of the model (an EMA copy) runs untapped.

    Attributes:
        name: Qualified name of the hooked classifier module.
        dim: The embedding's dimension D, measured by a probe forward.
    """

    name: str
    dim: int

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.dim = 0
        self._sinks: list[list[torch.Tensor]] = []
        self._handle = module.register_forward_pre_hook(_make_pre_hook(weakref.ref(self), weakref.ref(module)))

    def _record(self, x: torch.Tensor) -> None:
        if self._sinks:
            sink = self._sinks[-1]
            sink.clear()
            sink.append(_as_embedding(x))

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Captures the embedding of every forward run inside the block.

        Yields:
            A list that holds, after a forward, one tensor (B, D): the most recent forward's classifier input,
            attached to the autograd graph. Nested blocks capture into the innermost list.
        """
        sink: list[torch.Tensor] = []
        self._sinks.append(sink)
        try:
            yield sink
        finally:
            for position in range(len(self._sinks) - 1, -1, -1):
                if self._sinks[position] is sink:
                    del self._sinks[position]
                    break

    def remove(self) -> None:
        """Removes the hook. Idempotent."""
        self._handle.remove()
        self._sinks.clear()


def _make_pre_hook(tap_ref: weakref.ref, module_ref: weakref.ref) -> Callable:
    # A closure over weak references (deepcopy keeps functions as they are): a copied model fires this very hook
    # on its own module, which the identity check ignores.
    def hook(module: nn.Module, args: tuple) -> None:
        tap = tap_ref()
        if tap is None or module is not module_ref() or not args:
            return
        tap._record(args[0])

    return hook


def build_embedding_tap(model: nn.Module, image_size: tuple[int, int] | int | None = None) -> EmbeddingTap:
    """Hooks the input of ``model``'s final classifier layer and measures its dimension.

    Args:
        model: A timm model or a transformers image classifier (any type: the classifier is found by a probe).
        image_size: Input size of the probe forwards, ``(H, W)`` or a side. Default: the model's own input size
            (timm ``patch_embed.img_size`` / ``pretrained_cfg``, transformers ``config.image_size``), else 224.

    Returns:
        The installed tap, with ``dim`` measured by a no-grad forward in eval mode (every module's training flag
        restored afterwards).

    Raises:
        ValueError: The model has no single classifier layer, or its input is not a (B, D) embedding.
    """
    size = _pair(image_size) if image_size is not None else _default_image_size(model)
    name, module = find_classifier(model, size)
    tap = EmbeddingTap(name, module)
    try:
        with tap.capture() as sink, _eval_no_grad(model):
            _logits_of(model, _dummy_input(model, size))
        if len(sink) != 1:
            raise ValueError(f"{type(model).__name__}: the probe forward did not run the classifier {name!r}")
        tap.dim = int(sink[0].shape[1])
    except BaseException:
        tap.remove()
        raise
    return tap
