"""No module imports a module above it. The layers are declared here, lowest first; every
module of the package must be in one, so a new module is placed deliberately.

Imports are read from the source (ast), including those inside functions (a lazy import is
still a dependency); only imports under ``if TYPE_CHECKING:`` are left out (annotations).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "python" / "apportion"

# Lowest first. A module may import its own layer and the layers below it. A name stands for
# that module and (unless a longer name is listed) everything under it; "apportion" alone is
# the package's __init__.
LAYERS: list[list[str]] = [
    ["apportion._core", "apportion.errors", "apportion.context", "apportion.stats", "apportion._table",
     "apportion._version", "apportion.futures", "apportion._private.checks"],
    ["apportion.topology", "apportion.batching", "apportion.metrics"],
    ["apportion.placement", "apportion.gpu"],
    ["apportion.spec"],
    ["apportion.adapters", "apportion._private"],
    ["apportion.load.spec", "apportion.load._http"],
    ["apportion.load.report", "apportion.load.remote"],
    ["apportion.load.driver"],
    ["apportion.load"],
    ["apportion.runtime"],
    ["apportion.tune.cost"],
    ["apportion.config"],
    ["apportion.controller"],
    ["apportion.tune.allocation", "apportion.tune.noise"],
    ["apportion.tune.search"],
    ["apportion.tune.measure", "apportion.tune.plot", "apportion.tune.progress", "apportion.tune.report"],
    ["apportion.tune.tuner"],
    ["apportion.tune"],
    ["apportion.serve", "apportion.ray"],
    ["apportion.demo", "apportion.cli"],
    ["apportion", "apportion.__main__", "apportion.examples"],
]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def layer_of(name: str) -> int | None:
    best: tuple[int, int] | None = None  # (length of the matching entry, layer)
    for i, entries in enumerate(LAYERS):
        for e in entries:
            match = name == e if e == "apportion" else (name == e or name.startswith(e + "."))
            if match and (best is None or len(e) > best[0]):
                best = (len(e), i)
    return None if best is None else best[1]


def _type_checking_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The apportion modules ``name`` imports (``from pkg import sub`` counts as pkg.sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m == "apportion" or m.startswith("apportion.")}


def test_every_module_has_a_layer_and_every_layer_entry_exists() -> None:
    mods = modules()
    assert [m for m in mods if layer_of(m) is None] == []
    known = set(mods) | {"apportion._core"}  # the extension module
    stale = [e for entries in LAYERS for e in entries if e not in known]
    assert stale == []


def test_no_module_imports_a_module_above_it() -> None:
    mods = modules()
    known = set(mods) | {"apportion._core"}
    upward = []
    for name, path in mods.items():
        mine = layer_of(name)
        assert mine is not None
        for dep in sorted(imports(name, path, known)):
            theirs = layer_of(dep)
            if theirs is None or theirs > mine:
                upward.append(f"{name} (layer {mine}) imports {dep} (layer {theirs})")
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    # The rule can fail: a stats module importing the runtime inside a function is caught.
    f = tmp_path / "stats.py"
    f.write_text("def f():\n    from .runtime import Runtime\n    return Runtime\n"
                 "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cli import main\n")
    deps = imports("apportion.stats", f, set(modules()))
    assert deps == {"apportion.runtime"}
    assert layer_of("apportion.runtime") > layer_of("apportion.stats")  # type: ignore[operator]


@pytest.mark.parametrize("package", ["apportion.tune", "apportion"])
def test_plotting_and_progress_load_only_when_asked(package: str) -> None:
    code = (f"import sys, importlib; importlib.import_module({package!r}); "
            "print(sorted(m for m in sys.modules if m in ('apportion.tune.plot', 'apportion.tune.progress', "
            "'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    code = "from apportion.tune import Progress, plot_bars; print(plot_bars.__module__, Progress.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["apportion.tune.plot", "apportion.tune.progress"]
