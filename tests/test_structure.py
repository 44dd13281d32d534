"""The layering of the source tree, read from the code itself: no import circle inside
`protocol/`, `node/`, `cli/` or `plugin/`, no import that runs up a layer, no oversized node module.

Only imports that run when a module loads count: those under `if TYPE_CHECKING:` are for the
type checker and create no runtime edge.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folder -> installed name, as pyproject's package-dir maps them; listed bottom layer first.
LAYERS = {"protocol": "valuemesh.protocol", "node": "valuemesh.node", "cli": "valuemesh.cli",
          "plugin": "valuemesh.plugin"}
# What each layer may import from the others (itself always).
MAY_IMPORT = {
    "valuemesh.protocol": set(),
    "valuemesh.node": {"valuemesh.protocol"},
    "valuemesh.cli": {"valuemesh.protocol", "valuemesh.node"},
    "valuemesh.plugin": {"valuemesh.protocol", "valuemesh.node", "valuemesh.cli"},
}
MAX_NODE_LINES = 700


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, ns in LAYERS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            name = ".".join([ns, *rel.parts]).removesuffix(".__init__")
            found[name] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(sub) for stmt in node.body for sub in ast.walk(stmt))
    return skipped


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                if target in mods and target != name:
                    edges[name].add(target)
    return edges


def _circles(edges: dict[str, set[str]], names: list[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in names:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(edges.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, todo = work[-1]
            if todo:
                w = todo.pop()
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, sorted(edges.get(w, ()))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


MODS = _modules()
EDGES = _edges(MODS)


def _layer(name: str) -> str:
    return ".".join(name.split(".")[:2])


def test_the_walk_sees_the_tree() -> None:
    # Guards the test itself: a walk that found nothing would pass everything below.
    assert "valuemesh.protocol.records" in MODS
    assert "valuemesh.protocol.records" in EDGES["valuemesh.protocol.ledger"]


def test_circle_finder_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, ["a", "b", "c", "d"]) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", sorted(LAYERS.values()))
def test_no_import_circle(layer: str) -> None:
    names = sorted(n for n in MODS if _layer(n) == layer)
    inner = {n: {t for t in EDGES.get(n, ()) if _layer(t) == layer} for n in names}
    assert _circles(inner, names) == []


def test_imports_point_down_only() -> None:
    upward = sorted(f"{a} -> {b}" for a, targets in EDGES.items() for b in targets
                    if _layer(b) != _layer(a) and _layer(b) not in MAY_IMPORT[_layer(a)])
    assert upward == []


def test_protocol_is_pure() -> None:
    # The sans-I/O core: no sockets, event loop, database, clock or randomness of its own.
    banned = {"asyncio", "aiohttp", "aiosqlite", "sqlite3", "socket", "time", "random", "secrets", "zeroconf"}
    found = []
    for name, path in MODS.items():
        if _layer(name) != "valuemesh.protocol":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            roots = []
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots = [node.module.split(".")[0]]
            # The simulator draws from `random.Random(seed)`, a seeded generator passed along.
            allowed = {"random"} if name.startswith("valuemesh.protocol.sim.") else set()
            found += [f"{name} imports {r}" for r in roots if r in banned - allowed]
    assert found == []


def test_node_modules_stay_small() -> None:
    big = sorted(f"{p.relative_to(ROOT)}: {n} lines" for name, p in MODS.items()
                 if _layer(name) == "valuemesh.node" and (n := len(p.read_text().splitlines())) > MAX_NODE_LINES)
    assert big == []
