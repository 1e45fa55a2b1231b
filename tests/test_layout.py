"""The package's layout: layers and import directions, no cycles, module and function sizes.

Read from the source with :mod:`ast` (nothing is imported except in the last test). The layers, lowest
first; a module may import its own component and components of lower layers, never one of the same
layer or a higher one. Imports under ``if TYPE_CHECKING:`` are not counted (a type named in a public
signature documents the API; the code does not depend on it):

0  _version, _settings, _docs, _metrics, _options   foundations: no scbert_tl imports between components
1  model, datasets, data                            torch network; verified assets; where data lives in AnnData / h5ad
2  train, pp, _scbert                               loops and inference on tokens; binning; the model object
3  tl, pl                                           the AnnData-facing tools and plots
4  _cli                                             the shell command (heavy imports only inside commands)
5  __main__; the package root is the facade: it may import anything and nothing may import it
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "scbert_tl"
LAYERS = {
    "_version": 0,
    "_settings": 0,
    "_logging": 0,
    "_docs": 0,
    "_metrics": 0,
    "_paths": 0,
    "_files": 0,
    "_options": 0,
    "model": 1,
    "datasets": 1,
    "data": 1,
    "train": 2,
    "pp": 2,
    "_scbert": 2,
    "tl": 3,
    "pl": 3,
    "_cli": 4,
    "__main__": 5,
}
ROOT_RANK = 6
# third-party packages a component must not import (what makes each layer what it is)
FORBIDDEN_THIRD_PARTY = {
    "model": {"anndata", "scanpy", "pandas", "h5py", "sklearn"},
    "train": {"anndata", "scanpy", "h5py"},
    "data": {"torch", "scanpy"},
    "pp": {"torch"},
    "_options": {"torch", "numpy", "pandas", "anndata"},
    "_docs": {"torch", "numpy", "pandas", "anndata"},
}
# what `_cli` modules may import when they are imported (anything else only inside a command's function)
CLI_IMPORT_TIME = {f"{PACKAGE}._cli", f"{PACKAGE}._options", f"{PACKAGE}._version", f"{PACKAGE}._docs"}
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80  # from `def` to the end, docstring lines not counted
EXEMPT_FROM_SIZES = {f"{PACKAGE}.model._favor"}  # the fused FAVOR+ kernels (forward/backward as written out)

# Violations that exist today and are being removed step by step: every entry must still be true (a
# stale entry fails), and nothing outside this set may appear. Empty when the layout is done.
ALLOWED: set[str] = set()


# ---------------------------------------------------------------------------------------------- reading
def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _component(module: str) -> str:
    parts = module.split(".")
    return "" if len(parts) == 1 else parts[1]


def _rank(module: str) -> int:
    comp = _component(module)
    return ROOT_RANK if comp == "" else LAYERS[comp]


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, *, import_time_only: bool = False):
    """``(target module, imported name or None)`` for every import in ``module`` that runs.

    Imports under ``if TYPE_CHECKING:`` never run. ``import_time_only``: only those that run when the
    module is imported (not inside functions or classes).
    """

    def visit(nodes):
        for node in nodes:
            if import_time_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if isinstance(node, ast.If) and _type_checking(node):
                yield from visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, None
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(module, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in MODULES:
                        yield sub, None  # `from . import tl`: the module tl
                    else:
                        yield target, alias.name
            else:
                yield from visit(ast.iter_child_nodes(node))

    yield from visit(TREES[module].body)


def _internal(target: str) -> str | None:
    """The scbert_tl module an import refers to (the longest known prefix), or None for third-party."""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return None
    parts = target.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _ in _imports(module):
            internal = _internal(target)
            if internal is not None and internal != module:
                graph[module].add(internal)
    return graph


# ---------------------------------------------------------------------------------------------- checks
def _direction_violations() -> set[str]:
    out = set()
    for module in MODULES:
        comp = _component(module)
        if comp == "":
            continue  # the facade
        if comp not in LAYERS:
            out.add(f"unplaced: {module} (add its component to LAYERS)")
            continue
        for target, name in _imports(module):
            internal = _internal(target)
            if internal is None:
                top = target.split(".")[0]
                if top in FORBIDDEN_THIRD_PARTY.get(comp, ()):
                    out.add(f"third-party: {module} imports {top}")
                continue
            other = _component(internal)
            if other != comp and _rank(internal) >= _rank(module):
                out.add(f"upward: {module} -> {internal}")
            if other != comp and name is not None and name.startswith("_") and not name.startswith("__"):
                out.add(f"private name: {module} imports {internal}.{name}")
    return out


def _cycles() -> set[str]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph, index, low, stack, on, out = _graph(), {}, {}, [], set(), set()

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.add("cycle: " + " <-> ".join(sorted(scc)))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            connect(v)
    return out


def _docstring_lines(node: ast.AST) -> int:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        if isinstance(body[0].value.value, str):
            return body[0].end_lineno - body[0].lineno + 1
    return 0


def _size_violations() -> set[str]:
    out = set()
    for module, path in MODULES.items():
        if module in EXEMPT_FROM_SIZES:
            continue
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES:
            out.add(f"module size: {module} is over {MAX_MODULE_LINES} lines")
        for node in ast.walk(TREES[module]):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1 - _docstring_lines(node)
                if length > MAX_FUNCTION_LINES:
                    out.add(f"function size: {module}.{node.name} is over {MAX_FUNCTION_LINES} lines")
    return out


def _cli_violations() -> set[str]:
    out = set()
    for module in MODULES:
        if _component(module) != "_cli":
            continue
        for target, _ in _imports(module, import_time_only=True):
            top = target.split(".")[0]
            if top in sys.stdlib_module_names or target == "__future__":
                continue
            if not any(target == ok or target.startswith(ok + ".") for ok in CLI_IMPORT_TIME):
                out.add(f"cli import time: {module} imports {target}")
    return out


def _all_violations() -> set[str]:
    return _direction_violations() | _cycles() | _size_violations() | _cli_violations()


# ---------------------------------------------------------------------------------------------- tests
def test_layout_has_no_new_violations():
    new = sorted(_all_violations() - ALLOWED)
    assert not new, "layout violations (see the module docstring for the rules):\n" + "\n".join(new)


def test_allowed_violations_are_still_true():
    stale = sorted(ALLOWED - _all_violations())
    assert not stale, "fixed, remove from ALLOWED in tests/test_layout.py:\n" + "\n".join(stale)


def test_pp_is_a_leaf():
    """pp imports nothing from tl, train or _scbert: not even under ``TYPE_CHECKING`` (a model is typed by a protocol)."""
    bad = set()
    for m in MODULES:
        if _component(m) != "pp":
            continue
        for node in ast.walk(TREES[m]):  # every import, wherever it stands
            if isinstance(node, ast.ImportFrom):
                target = _absolute(m, node)
                for alias in node.names:
                    sub = f"{target}.{alias.name}"  # `from .. import datasets`: the module datasets
                    internal = _internal(sub if sub in MODULES else target)
                    if internal is not None and _component(internal) in {"tl", "train", "_scbert", "_cli", ""}:
                        bad.add(f"{m} -> {internal}")
    assert not bad, sorted(bad)


def test_every_component_is_placed():
    comps = {_component(m) for m in MODULES} - {""}
    assert comps <= set(LAYERS), sorted(comps - set(LAYERS))


@pytest.mark.skipif(f"{PACKAGE}._cli" not in MODULES or not _is_package(f"{PACKAGE}._cli"), reason="no _cli package")
def test_command_line_imports_no_heavy_module_before_a_command_runs():
    code = (
        "import sys; from scbert_tl._cli import build_parser; build_parser(); "
        "print(','.join(m for m in ('torch', 'pandas', 'anndata', 'scanpy', 'numpy', 'sklearn') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=SRC)
    assert done.stdout.strip() == "", f"imported while only building the parser: {done.stdout.strip()}"
