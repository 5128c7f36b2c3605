"""The import paths of pat_hf 0.2 (one flat package), kept working for one release with a DeprecationWarning.

pat_hf 0.3 moved its modules into layer subpackages (``data/``, ``models/``, ``methods/``, ``training/``).
``import pat_hf.trainer`` or ``from pat_hf.teacher import Teacher`` still work: a finder on ``sys.meta_path``
answers for the old names only and hands back the module at its new place (the same module object, so
``isinstance`` checks and monkeypatching see one module), after warning once per old name. No alias module is
written to the package, and nothing is imported before an old name is asked for. The public API
(``from pat_hf import ...``) never changed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED_MODULES", "install"]

MOVED_MODULES: dict[str, str] = {
    "pat_hf.augment": "pat_hf.data.augment",
    "pat_hf.mixup": "pat_hf.data.mixup",
    "pat_hf.preprocessing": "pat_hf.data.views",
    "pat_hf.teacher": "pat_hf.models.teacher",
    "pat_hf.student": "pat_hf.models.student",
    "pat_hf.taps": "pat_hf.models.taps",
    "pat_hf.recompute": "pat_hf.models.recompute",
    "pat_hf.export": "pat_hf.models.export",
    "pat_hf.model_card": "pat_hf.models.model_card",
    "pat_hf.compile": "pat_hf.models.compile",
    "pat_hf.configuration": "pat_hf.training.configuration",
    "pat_hf.modeling": "pat_hf.training.modeling",
    "pat_hf.validation": "pat_hf.training.validation",
    "pat_hf.trainer": "pat_hf.training.trainer",
    "pat_hf.checkpointing": "pat_hf.training.checkpointing",
    "pat_hf.output_dir": "pat_hf.training.output_dir",
    "pat_hf.loss_guard": "pat_hf.training.loss_guard",
    "pat_hf.ema": "pat_hf.training.ema",
    "pat_hf.schedules": "pat_hf.training.schedules",
    "pat_hf.recipe": "pat_hf.training.recipe",
    "pat_hf.recipe_mixin": "pat_hf.training.recipe_mixin",
    "pat_hf.hub_push": "pat_hf.training.hub_push",
}
"""Old module name to new one. A moved package's submodules follow it (``pat_hf.taps.layout``). ``pat_hf.data``
is absent: it is the data subpackage now, and re-exports what the old module exported."""


def new_location(fullname: str) -> str | None:
    """Where an old (0.2) module name lives now, or None when the name did not move."""
    for old, new in MOVED_MODULES.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old) :]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, fullname: str, target: str) -> None:
        self.fullname = fullname
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"`{self.fullname}` moved to `{self.target}` in pat_hf 0.3; the old path works until 0.4. "
            f"Import from `{self.target}` (or the public API, `from pat_hf import ...`).",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The target module was executed by its own import; importlib has just set the alias spec on it: put its
        # own back, so that the module keeps one identity (reload, pickling by name, tracebacks).
        module.__spec__ = self._spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
        new = new_location(fullname)
        if new is None:
            return None
        is_package = new == "pat_hf.models.taps"
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(fullname, new), is_package=is_package)


def install() -> None:
    """Puts the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        # First: the default path finder would otherwise load a moved package's submodule a second time under its
        # old name (``pat_hf.taps.layout`` from ``pat_hf/models/taps/``), as a different module object.
        sys.meta_path.insert(0, _MovedModuleFinder())
