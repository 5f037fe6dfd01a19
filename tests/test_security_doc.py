"""docs/security.md's table of MongoDB privileges per component, checked against the code.

Pure: reads files, runs nothing. Two static analyses meet here:

1. **The store** (``cloudtask/store/*.py``): for every method of the store's classes (and the
   module-level functions that take a store), the collections it touches and how, read from
   the pymongo calls on its collection attributes (``self.tasks``, ``self.claims``,
   ``self.db["x"]``, ``self.db[CONSTANT]``, ``self.fs`` for GridFS, a local bound to one of
   those, a method that returns one), followed through the other store methods it calls or
   hands to ``guard``. Opening a store (``Store(...)``) is ``__init__`` -> ``_opened`` ->
   ``ensure_indexes``.
2. **Each component**: its own code (``cloudtask/agent``, ``cloudtask/center``, ``web``, each
   with its command in ``cloudtask/cli/servers.py``; for the CLI, ``cloudtask/cli`` but that
   file), and the shared code it reaches by name (``cloudtask/notify``,
   ``cloudtask/operations``, ``cloudtask/users.py``...): a shared function is reached when
   reached code names it, a shared class when reached code names it or a subclass, and a
   method of a reached class when reached code names the method (an attribute of that name).
   Every ``<store>.<method>`` in reached code (the receiver ``store``, ``self.store``,
   ``store()``, ``self._store()``, ``db``) is a use of the store. Conservative: a component is
   charged with whatever it could reach.

The test fails when a component's code uses a collection, or an operation on one, that its
column of the table in docs/security.md does not list (a new agent call that touches a new
collection fails it until the document and the role say so); when the table lists a use the
code no longer makes; and when a ``db.createRole`` of the document differs from its column.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
STORE_DIR = ROOT / "cloudtask" / "store"

# the operation kinds of the table (MongoDB privilege actions)
KINDS = ("find", "insert", "update", "remove", "createIndex", "listIndexes", "dropIndex")

# pymongo collection methods -> the privilege actions they need
PYMONGO_ACTIONS: dict[str, tuple[str, ...]] = {
    "find": ("find",),
    "find_one": ("find",),
    "aggregate": ("find",),
    "distinct": ("find",),
    "count_documents": ("find",),
    "estimated_document_count": ("find",),
    "insert_one": ("insert",),
    "insert_many": ("insert",),
    "update_one": ("update",),
    "update_many": ("update",),
    "replace_one": ("update",),
    "delete_one": ("remove",),
    "delete_many": ("remove",),
    "find_one_and_update": ("find", "update"),
    "create_index": ("createIndex",),
    "index_information": ("listIndexes",),
    "list_indexes": ("listIndexes",),
    "drop_index": ("dropIndex",),
    "bulk_write": (),  # what its requests are: see _bulk_actions
}
# GridFS (legacy gridfs.GridFS over the bucket "files"): put checks the bucket for emptiness
# and, when empty, lists and creates the two indexes of the GridFS spec before it inserts
GRIDFS = ("files.files", "files.chunks")
GRIDFS_ACTIONS: dict[str, tuple[str, ...]] = {
    "put": ("insert", "find", "listIndexes", "createIndex"),
    "get": ("find",),
    "delete": ("remove",),
}
BULK_REQUESTS = {
    "InsertOne": "insert",
    "ReplaceOne": "update",
    "UpdateOne": "update",
    "UpdateMany": "update",
    "DeleteOne": "remove",
    "DeleteMany": "remove",
}

Uses = dict[str, set[str]]  # collection -> actions


def _merge(into: Uses, other: Uses) -> None:
    for coll, actions in other.items():
        into.setdefault(coll, set()).update(actions)


# --- 1. the store ---------------------------------------------------------------------------


def _module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` assignments (collection names such as DELIVERIES)."""
    out = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            out[node.targets[0].id] = node.value.value
    return out


@dataclass
class StoreFunction:
    """One method (or module-level function taking a store) of the store package."""

    name: str
    node: ast.FunctionDef
    constants: dict[str, str]
    uses: Uses = field(default_factory=dict)
    calls: set[str] = field(default_factory=set)  # other store methods it calls or hands on
    param_uses: dict[str, set[str]] = field(default_factory=dict)  # self.db[param]: actions
    returns: str | None = None  # the collection it returns, if any


class StoreModel:
    """What every store method touches (see the module's docstring)."""

    def __init__(self, store_dir: Path = STORE_DIR) -> None:
        self.functions: dict[str, list[StoreFunction]] = defaultdict(list)
        self.attributes: dict[str, str] = {}  # self.<attr> -> collection
        trees = {p: ast.parse(p.read_text(), str(p)) for p in sorted(store_dir.glob("*.py"))}
        for tree in trees.values():
            self._collect_attributes(tree)
        for tree in trees.values():
            constants = _module_constants(tree)
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    for item in node.body:
                        if isinstance(item, ast.FunctionDef):
                            self._add(item, constants)
                elif (
                    isinstance(node, ast.FunctionDef)
                    and node.args.args
                    and node.args.args[0].arg == "store"  # all_revisions(store, ...)
                ):
                    self._add(node, constants)
        for _ in range(2):  # the second pass knows what every method returns
            for fn in self.all():
                fn.uses, fn.calls, fn.param_uses = {}, set(), {}
                self._scan(fn)

    def all(self) -> Iterator[StoreFunction]:
        for fns in self.functions.values():
            yield from fns

    def _add(self, node: ast.FunctionDef, constants: dict[str, str]) -> None:
        self.functions[node.name].append(StoreFunction(node.name, node, constants))

    def _collect_attributes(self, tree: ast.Module) -> None:
        """``self.x = self.db["name"]`` (and ``self.claims = self.runs``, ``self.fs =
        gridfs.GridFS(self.db, collection="files")``), and properties returning a collection."""
        constants = _module_constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    coll = self._literal_collection(node.value, constants)
                    if coll is None and isinstance(node.value, ast.Attribute):
                        coll = self.attributes.get(node.value.attr)
                    if coll is None and _is_gridfs(node.value):
                        coll = "GridFS"
                    if coll is not None:
                        self.attributes.setdefault(target.attr, coll)
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list
            ):
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and ret.value is not None:
                        coll = self._literal_collection(ret.value, constants)
                        if coll is not None:
                            self.attributes[node.name] = coll

    @staticmethod
    def _literal_collection(node: ast.AST, constants: dict[str, str]) -> str | None:
        """``<x>.db["name"]`` or ``<x>.db[CONSTANT]``: the name."""
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "db"
        ):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                return key.value
            if isinstance(key, ast.Name) and key.id in constants:
                return constants[key.id]
        return None

    def _collection(self, node: ast.AST, fn: StoreFunction, local: dict[str, str]) -> str | None:
        """The collection an expression is (a name, "GridFS", or "param:<name>"), or None."""
        literal = self._literal_collection(node, fn.constants)
        if literal is not None:
            return literal
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "db"
            and isinstance(node.slice, ast.Name)
        ):
            return f"param:{node.slice.id}"
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "store")
            and node.attr in self.attributes
        ):
            return self.attributes[node.attr]
        if isinstance(node, ast.Name) and node.id in local:
            return local[node.id]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "self"
        ):
            fn.calls.add(node.func.attr)
            returned = {f.returns for f in self.functions.get(node.func.attr, [])} - {None}
            if len(returned) == 1:
                return returned.pop()
        return None

    def _scan(self, fn: StoreFunction) -> None:
        local: dict[str, str] = {}
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(fn.node):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        # locals bound to a collection (in source order: a later use sees them)
        for node in ast.walk(fn.node):
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            ):
                coll = self._collection(node.value, fn, local)
                if coll is not None:
                    local[node.targets[0].id] = coll
        bulk = _bulk_actions(fn.node)
        for node in ast.walk(fn.node):
            if isinstance(node, ast.Return) and node.value is not None:
                coll = self._collection(node.value, fn, local)
                if coll is not None and not coll.startswith("param:"):
                    fn.returns = coll
            if not isinstance(node, ast.Attribute):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "store"):
                if node.attr in self.functions:  # self.method(...) or guard(self.method, ...)
                    fn.calls.add(node.attr)
                continue
            coll = self._collection(node.value, fn, local)
            if coll is None:
                continue
            call = parents.get(node)
            upsert = isinstance(call, ast.Call) and any(
                k.arg == "upsert" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in call.keywords
            )
            if coll == "GridFS":
                actions = set(GRIDFS_ACTIONS.get(node.attr, ()))
                for name in GRIDFS:
                    fn.uses.setdefault(name, set()).update(actions)
                continue
            if node.attr not in PYMONGO_ACTIONS:
                continue
            actions = set(PYMONGO_ACTIONS[node.attr])
            if node.attr == "bulk_write":
                actions |= bulk
            if upsert:
                actions.add("insert")
            if coll.startswith("param:"):
                fn.param_uses.setdefault(coll[len("param:") :], set()).update(actions)
            else:
                fn.uses.setdefault(coll, set()).update(actions)

    def uses_of(self, name: str, args: Iterable[ast.AST] = ()) -> Uses:
        """Everything calling store method ``name`` may touch, its own calls followed.
        A method taking its collection as an argument (``count("audit", ...)``) is resolved
        by the string literals of the call; an unresolved one raises."""
        out: Uses = {}
        self._follow(name, list(args), out, set())
        return out

    def _follow(self, name: str, args: list[ast.AST], out: Uses, seen: set[object]) -> None:
        for fn in self.functions.get(name, []):
            params = [a.arg for a in fn.node.args.args if a.arg not in ("self", "cls", "store")]
            bound = dict(zip(params, args))
            for param, actions in fn.param_uses.items():
                given = bound.get(param)
                if not (isinstance(given, ast.Constant) and isinstance(given.value, str)):
                    raise AssertionError(f"cannot tell which collection {name}() is given")
                _merge(out, {given.value: actions})
            _merge(out, fn.uses)
            key = (id(fn), tuple(ast.dump(a) for a in args))
            if key in seen:
                continue
            seen.add(key)
            for callee in sorted(fn.calls):
                sites = _calls_of(fn.node, callee)
                if not sites:  # handed on, guard(self.ensure_indexes, ...): no arguments
                    self._follow(callee, [], out, seen)
                for call in sites:  # a collection given as an argument goes along
                    given = [
                        bound.get(a.id, a) if isinstance(a, ast.Name) else a for a in call.args
                    ]
                    self._follow(callee, given, out, seen)


def _is_gridfs(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "GridFS"
    )


def _bulk_actions(fn: ast.FunctionDef) -> set[str]:
    """The actions of the bulk requests a function builds (ReplaceOne: update, upsert: insert)."""
    actions = set()
    for node in ast.walk(fn):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in BULK_REQUESTS
        ):
            actions.add(BULK_REQUESTS[node.func.id])
            if any(
                k.arg == "upsert" and isinstance(k.value, ast.Constant) and k.value.value
                for k in node.keywords
            ):
                actions.add("insert")
    return actions


def _calls_of(fn: ast.FunctionDef, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(fn)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    ]


# --- 2. the components ----------------------------------------------------------------------

# each component's own code: directories and files, or (file, function) for the command that
# starts it; SERVICES (the commands that run a component, and `up`) are no admin commands
SERVICES = "cloudtask/cli/servers.py"
COMPONENTS: dict[str, list[str | tuple[str, str]]] = {
    "agent": ["cloudtask/agent", (SERVICES, "agent")],
    "center": ["cloudtask/center", (SERVICES, "center")],
    "web": ["web", (SERVICES, "web")],
    "cli": ["cloudtask/cli"],  # but SERVICES
}
# the store's module-level functions taking a store (all_revisions(store, ...))
STORE_FUNCTIONS = {
    node.name
    for path in STORE_DIR.glob("*.py")
    for node in ast.parse(path.read_text()).body
    if isinstance(node, ast.FunctionDef) and node.args.args and node.args.args[0].arg == "store"
}
OWN_DIRS = ("cloudtask/agent", "cloudtask/center", "cloudtask/cli", "web")
# shared code: everything else but the store itself, the test tooling and the embedded servers
SHARED_EXCLUDED = ("cloudtask/store", "cloudtask/testing", "cloudtask/localservers")
STORE_RECEIVERS = {"store", "_store", "db"}
# methods called without their name in the code: construction, a thread's run
IMPLICIT_METHODS = {"__init__", "__post_init__", "__call__", "__enter__", "__exit__", "run"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _is_store_receiver(node: ast.AST) -> bool:
    """``store``, ``self.store``, ``store()``, ``self._store()``, ``x.store``, ``db``."""
    if isinstance(node, ast.Call) and not node.args:
        node = node.func
    if isinstance(node, ast.Name):
        return node.id in STORE_RECEIVERS
    return isinstance(node, ast.Attribute) and node.attr in STORE_RECEIVERS


@dataclass
class Unit:
    """A piece of shared code that can be reached: a function, a class or a method."""

    path: str
    name: str
    node: ast.AST
    cls: str | None = None  # for a method: its class
    bases: tuple[str, ...] = ()  # for a class


@functools.cache
def _shared_units() -> tuple[Unit, ...]:
    units = []
    for path in sorted((ROOT / "cloudtask").rglob("*.py")):
        rel = _rel(path)
        if rel.startswith(OWN_DIRS) or rel.startswith(SHARED_EXCLUDED):
            continue
        for node in _parse(path).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                units.append(Unit(rel, node.name, node))
            elif isinstance(node, ast.ClassDef):
                bases = tuple(ast.unparse(b).split(".")[-1] for b in node.bases)
                units.append(Unit(rel, node.name, node, bases=bases))
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        units.append(Unit(rel, item.name, item, cls=node.name))
    return tuple(units)


def _names(node: ast.AST) -> set[str]:
    """The names a piece of code refers to: names, attributes, imported names."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.ImportFrom):
            out.update(a.asname or a.name for a in n.names)
    return out


def _own_code(component: str) -> list[ast.AST]:
    nodes: list[ast.AST] = []
    for entry in COMPONENTS[component]:
        if isinstance(entry, tuple):
            path, function = entry
            tree = _parse(ROOT / path)
            found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
            assert found, f"{path} has no function {function}"
            nodes += found
            continue
        target = ROOT / entry
        paths = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        assert paths, f"nothing at {entry}"
        nodes += [_parse(p) for p in paths if _rel(p) != SERVICES]
    return nodes


def reached_code(component: str) -> list[ast.AST]:
    """The component's own code and the shared code it reaches (see the docstring)."""
    return _reach(component)[0]


def reached_units(component: str) -> list[str]:
    """The shared functions, classes and methods a component reaches, as path:name."""
    return sorted(f"{u.path}:{u.cls + '.' if u.cls else ''}{u.name}" for u in _reach(component)[1])


@functools.cache
def _reach(component: str) -> tuple[list[ast.AST], list[Unit]]:
    code = _own_code(component)
    names: set[str] = set()
    for node in code:
        names |= _names(node)
    units = _shared_units()
    reached: set[int] = set()
    classes: set[str] = set()
    changed = True
    while changed:
        changed = False
        for i, unit in enumerate(units):
            if i in reached:
                continue
            if isinstance(unit.node, ast.ClassDef):
                if unit.name not in names:
                    continue
                classes.add(unit.name)
                names.update(unit.bases)  # a reached class reaches its bases
            elif unit.cls is None:
                if unit.name not in names:
                    continue
            elif unit.cls not in classes or (
                unit.name not in names and unit.name not in IMPLICIT_METHODS
            ):
                continue
            reached.add(i)
            if not isinstance(unit.node, ast.ClassDef):
                code.append(unit.node)
                names |= _names(unit.node)
            else:  # its class body: attributes, decorators (not its methods)
                for item in unit.node.body:
                    if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        code.append(item)
                        names |= _names(item)
            changed = True
    return code, [units[i] for i in sorted(reached)]


def store_calls(code: Iterable[ast.AST]) -> list[tuple[str, list[ast.AST]]]:
    """Every use of the store in ``code``: (store method, the call's arguments). A method
    named without a call (``retry(store.save_runs, ...)``) counts, with no arguments."""
    found = []
    for node in code:
        calls = {id(n.func): n for n in ast.walk(node) if isinstance(n, ast.Call)}
        for n in ast.walk(node):
            call = calls.get(id(n))
            args = list(call.args) if call is not None else []
            if isinstance(n, ast.Attribute) and _is_store_receiver(n.value):
                found.append((n.attr, args))
            elif isinstance(n, ast.Name) and call is not None and n.id in STORE_FUNCTIONS:
                found.append((n.id, args))  # all_revisions(store, ...)
            elif isinstance(n, ast.Name) and n.id == "Store" and call is not None:
                found.append(("Store", []))  # Store(uri, ...)
            elif (
                isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id == "Store"
                and call is not None
            ):
                found.append(("Store", []))  # Store.from_config(cfg)
    return found


def component_uses(component: str, model: StoreModel, extra: Iterable[ast.AST] = ()) -> Uses:
    """What a component's code does to each collection (``extra``: more code of its own)."""
    out: Uses = {}
    code = [*reached_code(component), *extra]
    for name, args in store_calls(code):
        if name == "Store":
            name = "__init__"  # opening a store creates the indexes
        if name in model.functions:
            _merge(out, model.uses_of(name, args))
    return out


def undocumented(used: Uses, documented: dict[str, set[str]]) -> dict[str, list[str]]:
    """collection -> the actions ``used`` makes that ``documented`` does not list."""
    return {
        coll: sorted(actions - documented.get(coll, set()))
        for coll, actions in sorted(used.items())
        if actions - documented.get(coll, set())
    }


# --- the document ---------------------------------------------------------------------------

TABLE_HEADING = "## MongoDB: what each component reads and writes"
COLUMNS = ("agent", "center", "web", "cli")


def doc_table(text: str | None = None) -> dict[str, dict[str, set[str]]]:
    """component -> collection -> actions, from the table under TABLE_HEADING: a row per
    collection (its name in backquotes), a column per component, each cell the actions
    (comma-separated) or ``—``."""
    text = DOC.read_text() if text is None else text
    start = text.index(TABLE_HEADING)
    table: dict[str, dict[str, set[str]]] = {c: {} for c in COLUMNS}
    header: list[str] | None = None
    for line in text[start:].splitlines()[1:]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            if header is not None and not line.strip():
                break  # the blank line after the table
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            assert header[1:] == list(COLUMNS), f"unexpected table header {cells}"
            continue
        if set(cells[0]) <= set("-: "):
            continue
        match = re.fullmatch(r"`([^`]+)`.*", cells[0])
        assert match, f"a row must name its collection in backquotes: {line}"
        coll = match.group(1)
        for column, cell in zip(COLUMNS, cells[1:]):
            actions = {a.strip() for a in cell.split(",") if a.strip() not in ("", "—", "-")}
            unknown = actions - set(KINDS)
            assert not unknown, f"{coll}, {column}: unknown actions {unknown}"
            if actions:
                table[column][coll] = actions
    assert header is not None, "the table was not found"
    return table


ROLES = {"cloudtaskAgent": "agent", "cloudtaskCenter": "center", "cloudtaskWeb": "web"}
LEFT_TO_THE_ADMIN_STEP = {"dropIndex"}  # the roles leave it out (see "Indexes")


def doc_roles(text: str | None = None) -> dict[str, dict[str, set[str]]]:
    """role -> collection -> actions, from every ``db.createRole({...})`` of the document
    (each argument is JSON)."""
    text = DOC.read_text() if text is None else text
    roles: dict[str, dict[str, set[str]]] = {}
    for match in re.finditer(r"db\.createRole\(", text):
        start = match.end()
        depth, end = 0, start
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        role = json.loads(text[start : end + 1])
        privileges: dict[str, set[str]] = {}
        for privilege in role["privileges"]:
            resource = privilege["resource"]
            assert resource["db"] == "cloudtask", f"{role['role']}: {resource}"
            privileges.setdefault(resource["collection"], set()).update(privilege["actions"])
        assert role["role"] not in roles, f"{role['role']} is created twice"
        roles[role["role"]] = privileges
    return roles


# --- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> StoreModel:
    return StoreModel()


def test_the_store_model_knows_the_collections(model: StoreModel) -> None:
    """The analysis sees what the store is known to do (so a blind spot fails here)."""
    assert model.uses_of("claim_runs")["runs"] >= {"insert", "find"}
    assert "events" in model.uses_of("claim_runs")  # run.missed, through the quiet recorder
    assert model.uses_of("insert_session")["sessions"] >= {"insert", "createIndex"}
    assert model.uses_of("put_file")["files.chunks"] >= {"insert"}
    assert model.uses_of("put_file")["file_heads"] >= {"update", "insert"}
    assert model.uses_of("insert_deliveries") == {"deliveries": {"insert"}}
    assert model.uses_of("secret_values") == {"secrets": {"find"}}
    opened = model.uses_of("__init__")
    assert opened["users"] == {"createIndex"}
    assert opened["tasks"] >= {"createIndex", "find", "update"}
    assert opened["events"] >= {"createIndex", "listIndexes", "dropIndex"}
    count = ast.parse('count("audit", {})').body[0].value  # type: ignore[attr-defined]
    assert model.uses_of("count", count.args) == {"audit": {"find"}}
    with pytest.raises(AssertionError):
        model.uses_of("count")


def test_the_components_reach_what_they_are_known_to_use(model: StoreModel) -> None:
    agent = component_uses("agent", model)
    assert agent["runs"] >= {"insert", "update", "find"} and agent["leases"]
    assert "files.chunks" in agent and "run_reports" in agent
    center = component_uses("center", model)
    assert {"deliveries", "alert_state", "agents"} <= set(center)
    web = component_uses("web", model)
    assert {"audit", "sessions", "login_failures", "users", "secrets"} <= set(web)
    cli = component_uses("cli", model)
    assert {"audit", "users", "secrets"} <= set(cli)


@pytest.mark.parametrize("component", COLUMNS)
def test_the_table_lists_every_use(model: StoreModel, component: str) -> None:
    missing = undocumented(component_uses(component, model), doc_table()[component])
    assert not missing, (
        f"the {component}'s code uses collections (or operations) that docs/security.md's "
        f"table and its role do not list: {missing}"
    )


def test_the_table_claims_nothing_the_code_does_not_do(model: StoreModel) -> None:
    """The table is the code's uses exactly, so a role built from it grants nothing extra."""
    table = doc_table()
    for component in COLUMNS:
        used = component_uses(component, model)
        extra = {
            coll: sorted(actions - used.get(coll, set()))
            for coll, actions in table[component].items()
            if actions - used.get(coll, set())
        }
        assert not extra, f"{component}: the table lists uses the code does not make: {extra}"


def test_a_new_agent_call_fails_the_check(model: StoreModel) -> None:
    """An agent that starts to read the alert settings, or the audit log, is caught."""
    documented = doc_table()["agent"]
    for call, collection in (
        ("self.store.read_settings_doc('alerts')", "settings"),
        ("store().audit_page({}, 50)", "audit"),
    ):
        added = ast.parse(f"def run(self):\n    {call}\n")
        used = component_uses("agent", model, extra=[added])
        assert collection in undocumented(used, documented), call


def test_the_parser_reads_cells() -> None:
    text = "\n".join(
        [
            TABLE_HEADING,
            "",
            "| collection | agent | center | web | cli |",
            "| --- | --- | --- | --- | --- |",
            "| `runs` (claims) | find, insert | — | find | — |",
            "",
            "## next",
        ]
    )
    table = doc_table(text)
    assert table["agent"] == {"runs": {"find", "insert"}}
    assert table["center"] == {} and table["web"] == {"runs": {"find"}}


def test_the_roles_grant_the_table() -> None:
    """Each role's privileges are its component's column, but what the admin step does."""
    table = doc_table()
    roles = doc_roles()
    assert set(roles) == set(ROLES)
    for role, component in ROLES.items():
        wanted = {
            coll: actions - LEFT_TO_THE_ADMIN_STEP
            for coll, actions in table[component].items()
            if actions - LEFT_TO_THE_ADMIN_STEP
        }
        assert roles[role] == wanted, f"{role} differs from the table's {component} column"


def test_the_cli_can_use_the_web_role() -> None:
    """The admin commands need nothing the web's role lacks (the document says so)."""
    table = doc_table()
    for coll, actions in table["cli"].items():
        extra = actions - LEFT_TO_THE_ADMIN_STEP - table["web"].get(coll, set())
        assert not extra, f"the CLI needs {sorted(extra)} on {coll}, which the web's role lacks"


def test_the_service_commands_are_no_admin_commands() -> None:
    """The CLI's column leaves out cloudtask/cli/servers.py: it must hold only the commands
    that run a component (and ``up``, everything on one machine as one user)."""
    commands = {
        node.name
        for node in _parse(ROOT / SERVICES).body
        if isinstance(node, ast.FunctionDef)
        and any("command" in ast.unparse(d) for d in node.decorator_list)
    }
    assert commands == {"agent", "web", "center", "up"}
