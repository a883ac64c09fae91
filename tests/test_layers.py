"""The layers of qproxy/, checked from the source: every import (lazy ones and those under
TYPE_CHECKING too) points down or sideways, never up; no module imports itself back
through others; the core imports no I/O library.

Layers, bottom to top (README.md, "Architecture")::

    foundation  errors, config, keys, headers, redis_url, metrics
    core        qproxy.core.*           no I/O at all
    stores      qproxy.stores.*         each backend behind a Protocol
    compose     qproxy.compose          builds the stores from Config
    lifecycle   qproxy.lifecycle.*      ingest, commit, queue, delete
    worker      qproxy.worker.*         transfer, purge, sweep, reconcile, the Celery app
    drivers     qproxy.drivers.*        WSGI, ASGI, Django          serve: qproxy.serve.*
    public      qproxy, qproxy.wsgi, qproxy.asgi, qproxy.resolver, qproxy.contrib.*
    tools       qproxy.ops.*, qproxy.dev.*, qproxy.__main__
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qproxy"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "qproxy.errors",
            "qproxy.config",
            "qproxy.keys",
            "qproxy.headers",
            "qproxy.redis_url",
            "qproxy.metrics",
            "qproxy.logs",
        ),
    ),
    ("core", ("qproxy.core",)),
    ("stores", ("qproxy.stores",)),
    ("compose", ("qproxy.compose",)),
    ("lifecycle", ("qproxy.lifecycle",)),
    ("worker", ("qproxy.worker",)),
    ("drivers", ("qproxy.drivers", "qproxy.serve")),
    ("public", ("qproxy.wsgi", "qproxy.asgi", "qproxy.resolver", "qproxy.contrib", "qproxy")),
    ("tools", ("qproxy.ops", "qproxy.dev", "qproxy.__main__")),
]

# What "no I/O" means for the core: none of these, and no open().
IO_MODULES = frozenset(
    {
        "os", "io", "socket", "ssl", "select", "selectors", "asyncio", "threading",
        "multiprocessing", "subprocess", "shutil", "tempfile", "pathlib", "ctypes", "mmap",
        "sqlite3", "urllib.request", "http.client", "redis", "hiredis", "boto3", "botocore",
        "celery", "kombu", "httpx", "anyio", "starlette", "uvicorn", "granian", "django",
    }
)  # fmt: skip


def layer_of(module: str) -> int:
    """The rank of ``module``: the longest layer prefix that names it wins."""
    best: tuple[int, int] | None = None  # (prefix length, rank)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            named = module == prefix or module.startswith(prefix + ".")
            if named and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, known: set[str]) -> list[tuple[str, int]]:
    """Every module ``source`` imports, wherever the import statement is, with its line."""
    found: list[tuple[str, int]] = []
    is_package = module in known and any(m.startswith(module + ".") for m in known)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def opens_files(source: str) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open"
    ]


def load(root: Path) -> dict[str, str]:
    return {module_name(p, root): p.read_text() for p in sorted(root.rglob("*.py"))}


def violations(sources: dict[str, str]) -> list[str]:
    """Everything wrong with the imports of ``sources`` (module name -> source)."""
    known = set(sources)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, source in sources.items():
        rank = layer_of(module)
        core = LAYERS[rank][0] == "core"
        for target, line in imports_of(source, module, known):
            top = target.split(".")[0]
            if core and (target in IO_MODULES or top in IO_MODULES):
                problems.append(f"{module}:{line} core imports the I/O library {target}")
            if top != "qproxy":
                continue
            if target not in known:
                problems.append(f"{module}:{line} imports {target}, which does not exist")
                continue
            if target != module:
                graph[module].add(target)
            if layer_of(target) > rank:
                problems.append(
                    f"{module}:{line} ({LAYERS[rank][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]}), a layer above it"
                )
        if core:
            problems += [f"{module}:{line} core calls open()" for line in opens_files(source)]
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append([*sorted(group), sorted(group)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_qproxy_keeps_its_layers() -> None:
    sources = load(PACKAGE)
    assert len(sources) > 30  # the walk found the package
    assert violations(sources) == []


def test_every_layer_has_modules() -> None:
    ranks = {layer_of(m) for m in load(PACKAGE)}
    assert ranks == set(range(len(LAYERS)))


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        # An upward import, a lazy one inside a function.
        (
            {
                "qproxy.core.x": "def f():\n    from qproxy.stores.y import Z\n",
                "qproxy.stores.y": "Z = 1\n",
            },
            "qproxy.core.x:2 (core) imports qproxy.stores.y (stores), a layer above it",
        ),
        # The core reaching for a socket, or a file.
        ({"qproxy.core.x": "import socket\n"}, "core imports the I/O library socket"),
        ({"qproxy.core.x": "from redis.asyncio import Redis\n"}, "I/O library redis.asyncio"),
        ({"qproxy.core.x": "data = open('f').read()\n"}, "qproxy.core.x:1 core calls open()"),
        # A cycle inside one layer, through a TYPE_CHECKING import.
        (
            {
                "qproxy.stores.a": "from qproxy.stores.b import B\n",
                "qproxy.stores.b": "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from qproxy.stores.a import A\n",
            },
            "import cycle: qproxy.stores.a -> qproxy.stores.b -> qproxy.stores.a",
        ),
        # The runtime importing the tools.
        (
            {"qproxy.serve.r": "import qproxy.ops.cli\n", "qproxy.ops.cli": ""},
            "qproxy.serve.r:1 (drivers) imports qproxy.ops.cli (tools), a layer above it",
        ),
    ],
)
def test_the_checker_finds_each_kind_of_violation(sources: dict[str, str], expected: str) -> None:
    found = violations(sources)
    assert any(expected in problem for problem in found), found


def test_relative_imports_are_resolved() -> None:
    known = {"qproxy.core", "qproxy.core.a", "qproxy.core.b"}
    assert imports_of("from .b import x\n", "qproxy.core.a", known) == [("qproxy.core.b", 1)]
    assert imports_of("from . import b\n", "qproxy.core", known) == [("qproxy.core.b", 1)]
