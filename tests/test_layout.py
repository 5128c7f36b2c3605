"""The package's layers: what each may import, no import cycle, module sizes, and the 0.2 import paths.

The import graph is read from the source (``ast``), with every import counted: module level, inside functions and
under ``TYPE_CHECKING``, since a cycle through a type-only import still ties two modules together for a reader.
"""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import pat_hf
from pat_hf import _compat

PACKAGE_DIR = Path(pat_hf.__file__).parent

# Each layer and the layers it may import (docs/index.md#architecture shows the same).
CORE = {"pat_hf.version", "pat_hf.errors", "pat_hf.losses", "pat_hf.checkpoint_integrity", "pat_hf._compat"}
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "models": {"core", "data", "models"},
    "methods": {"core", "data", "models", "methods"},
    "metrics": {"metrics"},
    "training": {"core", "data", "models", "methods", "metrics", "training"},
    "demo": {"core", "data", "models", "methods", "metrics", "training"},
    "root": {"core", "data", "models", "methods", "metrics", "training"},
}


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name to (path, is a package ``__init__``)."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ("pat_hf", *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module to the package modules it imports (a ``from X import name`` of a submodule counts as that submodule)."""
    modules = package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.split(".")[0] != "pat_hf":
                    continue
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "pat_hf"]
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def layer_of(module: str) -> str:
    if module == "pat_hf":
        return "root"
    if module in CORE:
        return "core"
    return module.split(".")[1]


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_each_layer_imports_only_the_layers_below_it():
    violations = [
        f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) not in ALLOWED[layer_of(module)]
    ]
    assert violations == []


def test_every_top_level_module_is_known_to_a_layer():
    top = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 10, top
    assert {f"pat_hf.{name}" for name in top} <= CORE | {"pat_hf.demo"}, top


def test_no_module_is_longer_than_450_lines():
    long = {
        str(p.relative_to(PACKAGE_DIR)): n
        for p in PACKAGE_DIR.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 450
    }
    assert long == {}


@pytest.mark.parametrize("old", sorted(_compat.MOVED_MODULES))
def test_a_0_2_import_path_still_works_with_a_deprecation_warning(old):
    new = _compat.MOVED_MODULES[old]
    for name in [n for n in sys.modules if n == old or n.startswith(old + ".")]:
        del sys.modules[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the module keeps its own identity
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(old in m and new in m for m in messages), messages


def test_a_moved_package_s_submodule_is_the_same_module_under_its_old_name():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from pat_hf.taps.layout import StageSpec as old_spec
    from pat_hf.models.taps.layout import StageSpec

    assert old_spec is StageSpec


def test_the_old_data_module_s_names_are_exported_by_the_data_layer():
    from pat_hf import data

    assert data.with_image_transforms is pat_hf.with_image_transforms
    assert data.load_fashion_mnist is pat_hf.load_fashion_mnist
    assert callable(data.collate_images) and callable(data.prepared_views)
