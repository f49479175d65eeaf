"""The package's shape (docs/ARCHITECTURE.md): imports flow one way, no module imports a
recipe, no library module grows past one concept's size. Read from the source files with
``ast`` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "torchtune_prefopt"
MAX_MODULE_LINES = 600


def _library_modules() -> Dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        rel = p.relative_to(REPO_ROOT)
        if "recipes" in rel.parts or "configs" in rel.parts:
            continue  # symlinks to the recipes / configs folders
        name = ".".join(rel.with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _imported(path: Path, module: str) -> List[str]:
    """Every module name an import statement in ``path`` names (lazy imports too)."""
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle of ``graph`` (empty if none), by depth-first search."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(v: str) -> List[str]:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return []

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return []


def _graph() -> Dict[str, Set[str]]:
    mods = _library_modules()
    graph = {}
    for name, path in mods.items():
        # a package's __init__ re-exports its submodules and they may import the package:
        # that is one unit, not a cycle
        graph[name] = {
            m
            for m in _imported(path, name)
            if m in mods
            and m != name
            and not m.startswith(name + ".")
            and not name.startswith(m + ".")
        }
    return graph


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) == []


def test_no_import_cycle_between_packages():
    def pkg(m: str) -> str:
        return ".".join(m.split(".")[:2])

    packages: Dict[str, Set[str]] = {}
    for m, deps in _graph().items():
        packages.setdefault(pkg(m), set()).update(pkg(d) for d in deps if pkg(d) != pkg(m))
    for deps in list(packages.values()):
        for d in deps:
            packages.setdefault(d, set())
    assert _cycle(packages) == []
    # the documented direction: training builds on reference, reference on data and models
    assert "torchtune_prefopt.training" not in packages["torchtune_prefopt.reference"]
    assert "torchtune_prefopt.reference" in packages["torchtune_prefopt.training"]


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_recipe():
    files = [
        *_library_modules().values(),
        *REPO_ROOT.glob("recipes/*.py"),
        *REPO_ROOT.glob("tests/*.py"),
    ]
    for path in files:
        bad = [n for n in _imported(path, "x.y") if "recipes" in n.split(".")]
        assert not bad, f"{path} imports {bad}"


def test_library_modules_stay_small():
    long = {
        str(p.relative_to(REPO_ROOT)): n
        for p in _library_modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
