"""The one-way import rule of CONTRIBUTING.md, checked on the source: no import cycle among the
library's modules (imports inside functions included), and the library never imports the
problem packages (``models/``, ``datamodules/``, installed as ``lightning_msvag.models`` and
``lightning_msvag.datamodules``)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "lightning_msvag"
PROBLEM_PACKAGES = ("lightning_msvag.models", "lightning_msvag.datamodules", "models", "datamodules")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set:
    """Every module ``path`` imports, absolute, at any depth of its code."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module or ""
            target = (f"{base}.{module}" if module else base) if node.level else module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import cli`
    return found


def _graph() -> dict:
    modules = {_module_name(p): p for p in LIBRARY.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_library_has_no_import_cycle():
    graph = _graph()
    assert len(graph) > 30  # the walk found the library
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how packages are built, and a
            # submodule importing its package's __init__ would be the cycle we look for
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_library_never_imports_the_problem_packages():
    offenders = {
        _module_name(path): sorted(m for m in _imports(path) if m.split(".")[0] in PROBLEM_PACKAGES
                                   or m.startswith(("lightning_msvag.models", "lightning_msvag.datamodules")))
        for path in LIBRARY.rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}
