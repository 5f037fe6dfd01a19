"""The code's layout rules, checked on the source: who may touch MongoDB's collections, and
which imports would make a circle. Pure: reads files, runs nothing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the production code: everything but the store itself and the test tooling
SOURCES = sorted(
    p
    for p in [*(ROOT / "cloudtask").rglob("*.py"), *(ROOT / "web").rglob("*.py")]
    if "store" not in p.relative_to(ROOT).parts[1:2] and "testing" not in p.parts
)
COLLECTION_METHODS = {
    "aggregate",
    "bulk_write",
    "count_documents",
    "create_index",
    "delete_many",
    "delete_one",
    "distinct",
    "drop_index",
    "find_one",
    "find_one_and_update",
    "index_information",
    "insert_many",
    "insert_one",
    "replace_one",
    "update_many",
    "update_one",
}
STORE_ATTRIBUTES = {"db", "client", "tasks", "runs", "claims", "events", "users", "audit"}
STORE_ATTRIBUTES |= {"leases", "agents", "reports", "fs"}


def _is_store(node: ast.AST) -> bool:
    """``store``, ``self.store``, ``store()``, or ``db`` (a store by another name)."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id in ("store", "db")
    return isinstance(node, ast.Attribute) and node.attr == "store"


def collection_uses(path: Path) -> list[str]:
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in STORE_ATTRIBUTES
            and _is_store(node.value)
        ):
            found.append(f"{where}:{node.lineno}: .{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            first = node.args[0] if node.args else None
            if name in COLLECTION_METHODS or (name == "find" and isinstance(first, ast.Dict)):
                found.append(f"{where}:{node.lineno}: .{name}()")
    return found


def test_the_rule_sees_a_collection_call(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(store):\n    return store().runs.find_one({'_id': 1})\n")
    assert len(collection_uses(sample)) == 2


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_outside_the_store_touches_a_collection(path: Path) -> None:
    assert collection_uses(path) == [], "use (or add) a method of cloudtask.store instead"


def _imports(path: Path, tree: ast.AST, modules: set[str]) -> set[str]:
    """The project's modules that ``tree`` (the code of ``path``) imports: ``from . import x``
    imports the module ``x`` when there is one, else the package."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in modules else module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out & modules


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def test_no_import_circles_between_modules() -> None:
    """No two modules import each other, not even for type checking only (a circle makes the
    pair one unit in disguise, and the import order matter)."""
    paths = [*(ROOT / "cloudtask").rglob("*.py"), *(ROOT / "web").rglob("*.py")]
    modules = {_module(p): p for p in paths}
    graph = {
        name: _imports(path, ast.parse(path.read_text()), set(modules)) - {name}
        for name, path in modules.items()
    }
    circles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and a in graph[b])
    assert circles == []
