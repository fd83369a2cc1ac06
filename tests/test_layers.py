"""The package's layers (docs/architecture.md): a lower layer never imports a higher one, and no module imports
itself back through others. Parsed from the source, every import counted — deferred ones inside functions too,
since a deferred import is still a dependency (it only hides a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import wsilocal

PACKAGE = Path(wsilocal.__file__).parent

# Lowest first; modules of one layer may import each other (without cycles). The order is the data flow:
# slide files → synthetic cohorts → models → configuration → 5x images → streaming → tile features → run
# directories → training → pretraining → prediction → demo → benchmarks → command line.
LAYERS = [
    {"errors", "atomic", "runtime", "plotting"},
    {"slide"},
    {"synth"},
    {"models"},
    {"config"},
    {"prepare"},
    {"stream"},
    {"features"},
    {"run"},
    {"train"},
    {"pretrain"},
    {"infer"},
    {"demo"},
    {"bench"},
    {"cli", "__main__"},
]
RANK = {part: rank for rank, layer in enumerate(LAYERS) for part in layer}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """The wsilocal modules that the file of ``module`` imports (``from wsilocal.x import y`` counts as
    ``wsilocal.x``, or as ``wsilocal.x.y`` when that is a module), wherever in the file the import is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("wsilocal")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if not name.startswith("wsilocal"):
                continue
            submodules = {f"{name}.{alias.name}" for alias in node.names}
            found |= {sub for sub in submodules if sub in MODULES} or {name}
    return found - {module}


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {module: imported_modules(path, module) & set(MODULES) for module, path in MODULES.items()}


def layer_of(module: str) -> str:
    """``wsilocal.train.trainer`` → ``train``; the package root ``wsilocal`` is the base layer."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def test_every_part_of_the_package_has_a_layer():
    assert {layer_of(module) for module in MODULES} - set(RANK) == set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_higher_layer(module):
    upward = sorted(target for target in GRAPH[module] if RANK[layer_of(target)] > RANK[layer_of(module)])
    assert upward == [], f"{module} imports the higher layer(s) {upward}"


def test_no_import_cycles():
    """Depth-first search for a back edge; the cycle found is named in the failure."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " → ".join(cycle)


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    """The parser itself: a function-level import and a relative import are both found."""
    source = tmp_path / "probe.py"
    source.write_text("from . import trainer\n\ndef f():\n    from wsilocal.infer import predict\n")
    assert imported_modules(source, "wsilocal.train.probe") == {"wsilocal.train.trainer", "wsilocal.infer.predict"}
