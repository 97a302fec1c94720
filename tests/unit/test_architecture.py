"""The layout holds: imports point one way, SQL lives only in the store's SQL modules, the reactor stays in serve.

Every module of engine/ is parsed (ast), its imports (lazy ones inside functions too) resolved to
engine modules, and checked against LAYERS. docs/architecture.md explains the order.
"""

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

ENGINE = ROOT / "engine"

# Lowest first. A module may import modules of its own package or of a lower layer, never of a
# higher one; the foundation modules may import each other (without a cycle).
LAYERS = [
    ("engine", "engine.errors", "engine.stamps", "engine.yamlconf", "engine.worker",
     "engine.profiling"),  # foundation
    ("engine.hl7",),
    ("engine.store",),
    ("engine.reconcile",),
    ("engine.delivery",),
    ("engine.transform",),
    ("engine.config",),
    ("engine.ops",),
    ("engine.mllp",),
    ("engine.serve",),
    ("engine.cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: its stage package, or the top-level module itself."""
    for layer in LAYERS:
        for unit in layer:
            if module == unit or (unit != "engine" and module.startswith(unit + ".")):
                return unit
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def layer_of(module: str) -> int:
    unit = unit_of(module)
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def imports_of(module: str) -> set[str]:
    """The engine modules ``module`` imports, anywhere in its code."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "engine")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "engine":
                continue
            for alias in node.names:
                # ``from . import name`` imports the submodule when there is one.
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_is_in_a_layer_and_at_most_six_modules_sit_at_the_top():
    for module in MODULES:
        unit_of(module)
    top = [p.name for p in ENGINE.glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 6, top


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    mine = layer_of(module)
    upward = sorted(target for target in GRAPH[module]
                    if layer_of(target) > mine or (layer_of(target) == mine and unit_of(target) != unit_of(module)
                                                   and mine != 0))
    assert not upward, f"{module} imports {upward}, which sit above it (tests/unit/test_architecture.py LAYERS)"


def test_no_import_cycles():
    # Depth-first search for a back edge; report the cycle found.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


SQL = re.compile(r"\b(SELECT\s+.+\s+FROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
                 r"CREATE\s+(TABLE|INDEX|VIRTUAL)|DROP\s+(TABLE|INDEX)|ALTER\s+TABLE|PRAGMA\s+\w+|ATTACH\s+DATABASE|"
                 r"BEGIN\s+IMMEDIATE|COMMIT|ROLLBACK)\b", re.DOTALL)


def sql_module(module: str) -> bool:
    """The store's backends: the shared queries (sql), SQLite (sqlite, sqlite_text), PostgreSQL (postgres)."""
    return module.startswith(("engine.store.sql", "engine.store.postgres"))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not sql_module(m)))
def test_sql_lives_only_in_the_stores_sql_modules(module):
    tree = ast.parse(MODULES[module].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            assert name.split(".")[0] not in ("sqlite3", "sqlite_utils", "psycopg", "psycopg_pool"), \
                f"{module} imports {name}: only the store's backends (engine/store/sql*.py, postgres*.py) may"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found = SQL.search(node.value)
            assert found is None, f"{module} has SQL ({found.group(0)[:40]!r}): it belongs in engine/store/ (sql.py, sqlite*.py, postgres*.py)"


REACTOR_EDGE = ("engine.serve", "engine.cli")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if unit_of(m) not in REACTOR_EDGE))
def test_nothing_below_serve_takes_the_global_reactor_or_its_thread_pool(module):
    text = MODULES[module].read_text()
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
            assert "reactor" not in [alias.name for alias in node.names], f"{module} imports the global reactor"
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("deferToThread", "getThreadPool", "callInThread"), \
                f"{module} uses {node.attr}: take a run(fn, *args) handed down from serve"


def test_the_checks_see_a_violation():
    # The checks themselves: an upward import and an SQL string are found.
    assert layer_of("engine.hl7.er7") < layer_of("engine.store.sqlite") < layer_of("engine.serve")
    assert "engine.store.base" in GRAPH["engine.store.sqlite"]
    assert SQL.search("SELECT id FROM messages WHERE x = ?")
    assert SQL.search("PRAGMA wal_checkpoint(PASSIVE)")
    assert not SQL.search("Select the route for a message from the table of routes")
