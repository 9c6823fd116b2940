"""The package's architecture as a rule on its import graph (docs/architecture.md).

Layers: math imports nothing of ours; infra imports only infra; engines import math, infra and the world
registry; worlds import infra and (each) their own package; studies import anything except a world's own
package. Only the registry (`opd.worlds`) names the worlds, and no workflow file imports one.
"""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "opd"
ALLOWED = {  # layer -> the layers it may import (its own included)
    "math": {"math"},
    "infra": {"infra"},
    "engines": {"engines", "math", "infra", "worlds"},
    "worlds": {"worlds", "infra"},
    "studies": {"studies", "engines", "math", "infra", "worlds"},
}
REGISTRY = "opd.worlds"  # the one module of the worlds layer others may import (and opd.worlds.prompts)
WORLD_PACKAGES = ("opd.worlds.miniature", "opd.worlds.paper")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str) -> set[str]:
    """Every opd module `path` imports, at module level or inside functions (relative imports resolved)."""
    found = set()
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    known = modules()
    return {m for m in found if m in known}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = {name: imports_of(path, name) for name, path in modules().items()}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m)))
def test_each_module_imports_only_layers_below_or_beside_it(module):
    own = layer(module)
    bad = sorted(m for m in GRAPH[module] if layer(m) and layer(m) not in ALLOWED[own])
    assert not bad, f"{module} ({own}) imports {bad}; {own} may import only {sorted(ALLOWED[own])}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) != "worlds"))
def test_nothing_outside_the_worlds_imports_a_world(module):
    bad = sorted(m for m in GRAPH[module] if m.startswith(WORLD_PACKAGES))
    assert not bad, f"{module} imports {bad}: take the world from the registry (opd.worlds.get) instead"


def test_worlds_do_not_import_each_other():
    for name, deps in GRAPH.items():
        for world in WORLD_PACKAGES:
            if name.startswith(world):
                others = [d for d in deps if d.startswith(WORLD_PACKAGES) and not d.startswith(world)]
                assert not others, f"{name} imports another world: {others}"


def test_the_registry_imports_no_world_at_import_time():
    deps = GRAPH[REGISTRY]
    assert not [d for d in deps if d.startswith(WORLD_PACKAGES)], deps


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in GRAPH.get(node, ()):
            if dep == node or dep.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(dep) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in GRAPH:
        if name not in state:
            visit(name, [name])


def test_workflow_files_import_no_world():
    rules = Path(__file__).resolve().parents[1] / "workflow"
    for path in [rules.parent / "Snakefile", *rules.rglob("*.smk")]:
        hits = re.findall(r"^\s*(?:from|import)\s+(opd\.worlds\.\w+)", path.read_text(), re.M)
        assert not [h for h in hits if h.startswith(WORLD_PACKAGES)], f"{path} imports {hits}"


def test_module_and_function_sizes():
    long_modules = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert not {n: k for n, k in long_modules.items() if k > MAX_MODULE_LINES}
    long_functions = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {size} lines")
    assert not long_functions, long_functions
