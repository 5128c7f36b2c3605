"""The registry of distillation methods: names to classes, nothing else.

It knows nothing of the methods themselves (as timm's ``_registry.py`` knows nothing of the models): a method
module registers its class with :func:`register_method` when it is imported, and the trainer and
``PATTrainingArguments`` look it up with :func:`get_method`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .base import DistillationMethod

__all__ = ["available_methods", "get_method", "loss_parts_table", "register_method"]

_METHODS: dict[str, type[DistillationMethod]] = {}

M = TypeVar("M", bound="type[DistillationMethod]")


def register_method(cls: M) -> M:
    """Class decorator adding a method to the registry under ``cls.name``.

    Example:
        >>> @register_method
        ... class MyKD(DistillationMethod):
        ...     name = "my_kd"
        ...     def forward(self, student, teacher, batch): ...
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty `name` to be registered.")
    existing = _METHODS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"A distillation method named {cls.name!r} is already registered ({existing.__name__}).")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Names of the registered distillation methods."""
    return sorted(_METHODS)


def get_method(name: str) -> type[DistillationMethod]:
    """The method class registered under ``name``.

    Raises:
        ValueError: For an unknown name, listing the registered ones.
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"Unknown distillation method {name!r}; registered methods: {', '.join(available_methods())}."
        ) from None


def loss_parts_table() -> str:
    """The Markdown table of what every registered method logs (docs/index.md holds it; a test compares)."""

    def show(parts: dict[str, str], prefix: str) -> str:
        items = []
        for name, meaning in parts.items():
            shown = (
                name.replace("{stage}", "1") + "` … `" + prefix + name.replace("{stage}", "4")
                if "{stage}" in name
                else name
            )
            items.append(f"`{prefix}{shown}`: {meaning.replace('{stage}', 'N')}")
        return "<br>".join(items)

    rows = ["| method | training (`loss_<part>`) | evaluation (`eval_loss_<part>`) |", "|---|---|---|"]
    for name in available_methods():
        cls = _METHODS[name]
        rows.append(f"| `{name}` | {show(cls.loss_parts, 'loss_')} | {show(cls.eval_loss_parts(), 'eval_loss_')} |")
    return "\n".join(rows)
