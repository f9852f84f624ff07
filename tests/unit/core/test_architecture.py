"""The house's shape: imports point down through the layers, and no module imports itself back.

Layers, bottom to top: ``core`` -> ``select`` / ``delta`` / ``data`` -> ``train`` / ``eval`` /
``merge`` -> ``recipes`` -> ``cli`` (and the ``surgical`` facade above all). Every import of a
surgical module counts, function-local ones included; only imports under ``TYPE_CHECKING`` (type
hints, never executed) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "src" / "surgical"

#: package -> rank; a module may import its own package or a package of lower rank
RANK = {
    "core": 0,
    "select": 1,
    "delta": 1,
    "data": 1,
    "train": 2,
    "eval": 2,
    "merge": 2,
    "recipes": 3,
    "cli": 4,
    "__main__": 5,
    "__init__": 5,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported surgical module, line) for every import outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("surgical")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("surgical"):
            for a in node.names:  # `from surgical.x import y` imports x.y when y is a module
                sub = f"{node.module}.{a.name}"
                out.append((sub if _exists(sub) else node.module, node.lineno))
    return out


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (SRC.parent / rel).with_suffix(".py").is_file() or (SRC.parent / rel / "__init__.py").is_file()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_import_points_down_the_layers():
    upward = []
    for module, imports in _graph().items():
        src = _package(module)
        for target, line in imports:
            dst = _package(target)
            if dst != src and RANK[dst] >= RANK[src]:
                upward.append(f"{module}:{line} imports {target} ({src} -> {dst})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    graph = {m: sorted({t for t, _ in imps if t != m}) for m, imps in _graph().items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if t.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t in graph and not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if not state.get(m):
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_library_packages_never_read_files_of_config():
    """Only recipes read YAML; delta never reaches into the training layer's module attributes."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        pkg = _package(_module_name(path))
        if pkg not in ("recipes", "cli"):
            assert "import yaml" not in text, f"{path} reads YAML outside the recipes"
        if pkg == "delta":
            assert "_sg_" not in text.replace('"_sg_', ""), f"{path} reads a training attribute"
