"""The rooms and their arrows (Layout in docs/design.md): checked on the source, not hoped for.

Every import counts, including those inside functions: a function-level import is still an
arrow, it only runs later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segops_sync"

# room -> the rooms it may import (besides itself). A room is the first dotted part after
# ``segops_sync`` ("sync", "klaviyo", "db", …), or the first two for the rooms inside sync/
# (SUBROOMS); top-level modules are rooms of their own.
ALLOWED: dict[str, set[str]] = {
    "states": set(),
    "errors": set(),
    "config": set(),
    "klaviyo": set(),  # the client knows no Celery, no database, nothing of ours
    # the fake Klaviyo: of ours, only the endpoints' names (see the test below), never the
    # client's tiers or scopes, nor anything the sync does
    "klaviyo_sim": {"klaviyo"},
    "secrets": {"config"},
    "db": {"config", "states", "errors"},
    "observability": {"config", "states", "klaviyo"},
    # fleet coordination in Redis (limiter, watcher, access, liveness, locks, clock): shared by
    # every worker of the fleet, it never touches the database
    "sync.fleet": {"config", "klaviyo", "observability"},
    # what SegOps hands us (membership, identity, traits): read, checked, written to our tables
    "sync.inputs": {"config", "errors", "db", "klaviyo"},
    # the pipeline (planner, batches, ledger, runs, verify, …), over the two rooms above
    "sync": {
        "config",
        "states",
        "errors",
        "db",
        "klaviyo",
        "secrets",
        "observability",
        "sync.fleet",
        "sync.inputs",
    },
    # the fields' rules and JSON shapes, spelled once; the models it reads are annotations only
    "shapes": {"states"},
    "connectors": {"config", "states", "errors", "db", "klaviyo", "secrets", "sync", "shapes"},
    "keys": {"config", "db", "secrets", "errors", "states"},
    # the worker refuses to start when no SEGOPS_SECRET_KEY decrypts the stored keys
    "celery": {"config", "states", "observability", "sync", "db", "keys"},
    "tasks": {"celery", "config", "states", "errors", "db", "sync", "observability"},
    "embedded": {"config"},
    "demo": {"config", "embedded", "klaviyo_sim", "sync", "states"},
    "web": set(),
    "follow": {"db", "sync"},  # the CLI's progress display
    "api_input": {"errors", "shapes"},  # the API's body checks
    "openapi": {"api_input", "shapes", "states"},  # the API's published document
}
# the faces may import every room below them (stack_demo: compose's demo, an entry point)
FACES = {"cli", "api", "stack_demo", "__init__"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(path: Path, module: str) -> Iterator[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        # `if TYPE_CHECKING:` blocks never run: they are annotations, not arrows.
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # `from segops_sync.sync import planner` imports the module planner too.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


SUBROOMS = {"sync.fleet", "sync.inputs"}


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and ".".join(parts[1:3]) in SUBROOMS:
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_room_imports_only_the_rooms_below_it() -> None:
    graph = _graph()
    wrong = []
    for module, targets in graph.items():
        room = _room(module)
        if room in FACES:
            continue
        assert room in ALLOWED, f"{module}: room {room!r} is missing from the table in this test"
        for target in targets:
            other = _room(target)
            # a room outside sync/ that may use sync/ may use its inner rooms too
            outer = other.partition(".")[0] if room not in SUBROOMS and room != "sync" else other
            if other != room and other not in ALLOWED[room] and outer not in ALLOWED[room]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "arrows pointing the wrong way: " + ", ".join(sorted(wrong))


def test_an_arrow_from_the_fleet_to_the_database_is_caught() -> None:
    """The fleet room is its own row: a Redis module importing the database is an arrow the
    table refuses (the test above would name it), not one hidden inside a broad sync row."""
    assert _room("segops_sync.sync.fleet.limiter") == "sync.fleet"
    assert _room("segops_sync.sync.inputs.traits") == "sync.inputs"
    assert _room("segops_sync.sync.planner") == "sync"
    assert "db" not in ALLOWED["sync.fleet"]
    assert "sync" not in ALLOWED["sync.fleet"] and "sync" not in ALLOWED["sync.inputs"]


def test_the_checker_sees_function_level_imports() -> None:
    """The cli -> demo arrow lives inside a function; if the walk missed it, the cycle test
    would pass for the wrong reason."""
    assert "segops_sync.demo" in _graph()["segops_sync.cli"]


# What the simulator may take from the client: the names of the endpoints and the revision it
# pins. Klaviyo's published tiers and scopes it keeps itself (klaviyo_sim.published), so that a
# wrong number in the client fails tests/klaviyo_sim/test_tiers_agree.py instead of passing.
SIMULATOR_MAY_TAKE = {
    ("segops_sync.klaviyo.endpoints", "Endpoint"),
    ("segops_sync.klaviyo.endpoints", "REVISION"),
}


def test_the_simulator_takes_only_endpoint_names_from_the_client() -> None:
    taken: set[tuple[str, str]] = set()
    for path in (PACKAGE / "klaviyo_sim").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                taken.update(
                    (alias.name, "*")
                    for alias in node.names
                    if _room(alias.name) == "klaviyo" and alias.name.startswith("segops_sync.")
                )
            elif isinstance(node, ast.ImportFrom) and not node.level:
                module = node.module or ""
                if module.startswith("segops_sync.") and _room(module) == "klaviyo":
                    taken.update((module, alias.name) for alias in node.names)
                elif module == "segops_sync":
                    taken.update((module, a.name) for a in node.names if a.name == "klaviyo")
    assert taken, "the walk found no import of the client at all: it is looking in the wrong place"
    assert taken <= SIMULATOR_MAY_TAKE, f"the simulator takes {sorted(taken - SIMULATOR_MAY_TAKE)}"
