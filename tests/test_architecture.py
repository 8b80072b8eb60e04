"""The layers of docs/architecture.md, checked on the source: every import (module level and
inside functions) of every module under styleinject/, api/ and worker/.

* styleinject (the library) imports neither api nor worker;
* api (service core and HTTP layer) never imports worker;
* api.core and worker import nothing of api's HTTP layer (only api.core);
* no import cycles inside any of the three packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("styleinject", "api", "worker")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _known(name: str) -> str | None:
    """The longest module of ours that ``name`` is or lies in."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports(module: str) -> set[str]:
    """Our modules that ``module`` imports anywhere in its source (``from x import y`` counts as
    importing x.y when that is a module, else x)."""
    path = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                     for alias in node.names]
        else:
            continue
        for name in names:
            target = _known(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: imports(module) for module in MODULES}


def _top(module: str) -> str:
    return module.split(".")[0]


def _cycles(package: str, graph: dict[str, set[str]] = GRAPH) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), inside one package."""
    nodes = [m for m in graph if _top(m) == package]

    def edges(m: str) -> list[str]:
        return [t for t in graph[m] if _top(t) == package]

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return out


def _violations(source: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m == source or m.startswith(source + ".")
                  for t in targets if any(t == f or t.startswith(f + ".") for f in forbidden))


def test_the_walk_sees_function_level_imports():
    # api.cli imports the core only inside its command functions
    assert "api.core.settings" in GRAPH["api.cli"]
    assert "api.core.celery" in GRAPH["worker.celery_app"]


def test_a_cycle_is_found():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert _cycles("p", graph) == [["p.a", "p.b", "p.c"]]


def test_the_library_imports_no_service_code():
    assert _violations("styleinject", ("api", "worker")) == []


def test_the_library_names_no_service_module_either():
    """No importlib.import_module("api.cli") detours: service parts reach the library only through
    the ``styleinject.commands`` entry point group."""
    import re

    dotted = re.compile(r"^(api|worker)(\.\w+)*(:\w+)?$")
    found = []
    for module, path in MODULES.items():
        if _top(module) != "styleinject":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and dotted.match(node.value):
                found.append(f"{module}: {node.value!r}")
    assert found == []


def test_api_never_imports_worker():
    assert _violations("api", ("worker",)) == []


HTTP_LAYER = tuple(m for m in MODULES if _top(m) == "api" and not m.startswith("api.core") and m != "api")


def test_the_service_core_imports_no_http_layer():
    assert _violations("api.core", HTTP_LAYER) == []


def test_the_worker_uses_only_the_service_core():
    assert _violations("worker", HTTP_LAYER) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    assert _cycles(package) == []
