"""The package's import graph, read with ``ast`` from the source files: every import of a bertq module,
at module level and inside functions (a function-level import still closes a cycle, it only hides it).
The graph has no cycle, layers import only downward, producer modules reach the worker only through a
command's lazy import, and no module is over MAX_LINES lines. (``import_module`` with a computed name is
not read: tasks/__init__.py loads its own task modules that way.)"""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
#: Package name -> source folder, as setuptools maps them (bertq.workers is workers/, ...).
PACKAGE_DIRS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
MAX_LINES = 400

#: Lowest first. A module imports modules of its own layer and of the layers listed before it, never
#: of one listed after. ``x.*`` names the package ``x`` and every module in it; a module that no entry
#: names fails test_every_module_has_one_layer, so a new module gets its place here.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["bertq", "bertq.errors", "bertq.log"]),
    ("public contract", ["bertq.schemas.*"]),
    ("light modules", [
        "bertq.settings", "bertq.tasks.*", "bertq.keys", "bertq.messages", "bertq.records", "bertq.streams",
        "bertq.connection", "bertq.embedded", "bertq.tiny_models", "bertq.files", "bertq.vectors", "bertq.tenants",
    ]),
    ("celery app", ["bertq.workers", "bertq.workers.app"]),
    ("rows through a model", [
        "bertq.workers.runner", "bertq.workers.batcher", "bertq.workers.budget", "bertq.workers.stages",
    ]),
    ("backends", ["bertq.workers.backends.*"]),
    ("engine", ["bertq.workers.engine.*"]),
    ("sources and sinks", ["bertq.workers.queues.*", "bertq.workers.streams.*"]),
    ("process parts", [
        "bertq.workers.health", "bertq.workers.metrics", "bertq.workers.events", "bertq.workers.webhooks",
        "bertq.workers.control", "bertq.workers.tracing",
    ]),
    ("worker process", ["bertq.workers.worker", "bertq.workers.supervise"]),
    ("producers", [
        "bertq.client", "bertq.status", "bertq.usage", "bertq.cli", "bertq.demo", "bertq.enrich.*", "bertq.__main__",
        "bertq.gateway.*",
    ]),
]  # fmt: skip
#: What a producer module may import from bertq.workers at module level: the Celery app, light itself.
LIGHT_WORKER_MODULES = {"bertq.workers", "bertq.workers.app"}
#: Producer modules an app imports: they import nothing of bertq.workers but the Celery app, not even lazily.
NO_WORKER_MODULES = {"bertq.client", "bertq.status", "bertq.messages", "bertq.records", "bertq.tenants"}
#: Commands' worker-side halves in bertq/: the engine in-process (`enrich --local`), which only the command
#: imports, inside the function that needs it (so a producer's install never loads them).
WORKER_SIDE_COMMANDS = {"bertq.enrich.local"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the bertq module imported
    path: Path
    line: int
    where: str  # MODULE_LEVEL, IN_FUNCTION or TYPE_CHECKING_ONLY

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.source} imports {self.target} {self.where}"


#: Where an import runs: when the module is imported, when the function is called, or never (a type
#: checker's import). All three count for cycles and layers; only the first loads the module at import.
MODULE_LEVEL, IN_FUNCTION, TYPE_CHECKING_ONLY = "at module level", "inside a function", "for type checking only"


def modules() -> dict[str, Path]:
    """Every module of the package, by name (bertq/x.py -> bertq.x, workers/engine/pool.py ->
    bertq.workers.engine.pool, a package's __init__.py -> the package)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))] = path
    return found


def imports_of(name: str, path: Path, source: str, known: set[str]) -> list[Import]:
    """The imports of bertq modules in ``source``. ``from package import name`` is the submodule
    ``package.name`` when there is one, else the package; relative imports are resolved."""
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, node: ast.stmt, where: str) -> None:
        edge = Import(name, target, path, node.lineno, where)
        if target in known and edge not in found:  # `from x import a, b` imports x once
            found.append(edge)

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inside = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inside = IN_FUNCTION
            if isinstance(child, ast.If) and where == MODULE_LEVEL and _is_type_checking(child.test):
                for statement in child.body:
                    visit(ast.Module([statement], []), TYPE_CHECKING_ONLY)
                for statement in child.orelse:
                    visit(ast.Module([statement], []), where)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, inside)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (child.level - 1)]
                    base = ".".join(package + ([child.module] if child.module else []))
                for alias in child.names:
                    submodule = f"{base}.{alias.name}"
                    add(submodule if submodule in known else base, child, inside)
            visit(child, inside)

    visit(ast.parse(source, str(path)), MODULE_LEVEL)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``"""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def graph() -> list[Import]:
    found = modules()
    known = set(found)
    return [edge for name, path in found.items() for edge in imports_of(name, path, path.read_text(), known)]


def layer_of(module: str) -> list[int]:
    """The indexes of the layers that name ``module`` (exactly one, when LAYERS is right)."""
    return [
        index
        for index, (_, patterns) in enumerate(LAYERS)
        for pattern in patterns
        if module == pattern.removesuffix(".*") or (pattern.endswith(".*") and module.startswith(pattern[:-1]))
    ]


def ranks(names: list[str]) -> dict[str, int]:
    """The layer of each module that has exactly one."""
    return {name: layers[0] for name in names if len(layers := layer_of(name)) == 1}


def cycles(edges: list[Import]) -> list[list[Import]]:
    """One shortest cycle through each group of modules that reach each other (Tarjan's strongly
    connected components), as the imports that close it."""
    out: dict[str, list[Import]] = defaultdict(list)
    for edge in edges:
        out[edge.source].append(edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for edge in out[node]:
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1 or any(edge.target == node for edge in out[node]):
                groups.append(group)

    for node in sorted({edge.source for edge in edges} | {edge.target for edge in edges}):
        if node not in index:
            connect(node)
    return [_shortest_cycle(min(group), group, out) for group in groups]


def _shortest_cycle(start: str, group: set[str], out: dict[str, list[Import]]) -> list[Import]:
    """Breadth first from ``start`` inside ``group`` until an import leads back to it."""
    reached: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while True:
        following = []
        for node in frontier:
            for edge in out[node]:
                if edge.target == start:
                    return [*reached[node], edge]
                if edge.target in group and edge.target not in reached:
                    reached[edge.target] = [*reached[node], edge]
                    following.append(edge.target)
        frontier = following


def upward_imports(edges: list[Import], rank: dict[str, int]) -> list[str]:
    """The imports of a module of a later layer than the importer's, each with both layers' names."""
    return [
        f"{edge}: layer {LAYERS[rank[edge.source]][0]!r} imports the later layer {LAYERS[rank[edge.target]][0]!r}"
        for edge in edges
        if edge.source in rank and edge.target in rank and rank[edge.target] > rank[edge.source]
    ]


def worker_imports(edges: list[Import], producers: set[str]) -> list[str]:
    """Producer modules' imports of the worker: any by NO_WORKER_MODULES, module-level ones by the rest."""
    wrong = []
    for edge in edges:
        if not edge.target.startswith("bertq.workers.") or edge.target in LIGHT_WORKER_MODULES:
            continue
        if edge.source in NO_WORKER_MODULES:
            wrong.append(f"{edge}: apps import {edge.source}, which may import only bertq.workers.app of the worker")
        elif edge.source in producers and edge.source not in WORKER_SIDE_COMMANDS and edge.where == MODULE_LEVEL:
            wrong.append(f"{edge}: a producer module imports the worker only inside the command that needs it")
    return wrong


def test_the_reader_sees_every_kind_of_import() -> None:
    source = (
        "import bertq.errors\n"
        "from bertq.workers.engine import delivery, memory as sink\n"
        "from bertq.schemas import Limits, TaskName\n"
        "from . import pool\n"
        "from .pool import Pool\n"
        "import json\n"
        "if TYPE_CHECKING:\n"
        "    from bertq.settings import Settings\n"
        "class Engine:\n"
        "    from bertq.log import get_logger\n"
        "    def run(self):\n"
        "        from bertq.workers.backends.models import ModelCache\n"
        "        return lambda: __import__('json')\n"
        "def later():\n"
        "    if True:\n"
        "        import bertq.workers.runner\n"
    )
    known = {
        "bertq.errors", "bertq.log", "bertq.schemas", "bertq.settings", "bertq.workers.engine",
        "bertq.workers.engine.delivery", "bertq.workers.engine.memory", "bertq.workers.engine.pool",
        "bertq.workers.backends.models", "bertq.workers.runner",
    }  # fmt: skip
    path = ROOT / "workers" / "engine" / "engine.py"
    found = [
        (edge.target, edge.line, edge.where) for edge in imports_of("bertq.workers.engine.engine", path, source, known)
    ]
    assert found == [
        ("bertq.errors", 1, MODULE_LEVEL),
        ("bertq.workers.engine.delivery", 2, MODULE_LEVEL),
        ("bertq.workers.engine.memory", 2, MODULE_LEVEL),
        ("bertq.schemas", 3, MODULE_LEVEL),  # once for its two names
        ("bertq.workers.engine.pool", 4, MODULE_LEVEL),
        ("bertq.workers.engine.pool", 5, MODULE_LEVEL),
        ("bertq.settings", 8, TYPE_CHECKING_ONLY),
        ("bertq.log", 10, MODULE_LEVEL),  # a class body runs at import
        ("bertq.workers.backends.models", 12, IN_FUNCTION),
        ("bertq.workers.runner", 16, IN_FUNCTION),
    ]


def test_a_cycle_is_found_and_spelled_out() -> None:
    path = ROOT / "workers" / "worker.py"
    pairs = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("e", "e")]
    edges = [Import(a, b, path, line, MODULE_LEVEL) for line, (a, b) in enumerate(pairs)]
    assert [[edge.target for edge in cycle] for cycle in cycles(edges)] == [["b", "c", "a"], ["e"]]
    assert cycles(edges[:2] + edges[3:4]) == []


def test_the_rules_name_the_offending_import() -> None:
    path = ROOT / "bertq" / "cli.py"
    names = ["bertq.errors", "bertq.workers.app", "bertq.workers.runner", "bertq.workers.worker", "bertq.cli"]
    rank = ranks(names)
    assert [rank[name] for name in names] == sorted(rank[name] for name in names)  # as LAYERS orders them
    upward = [
        Import("bertq.workers.runner", "bertq.workers.worker", path, 3, IN_FUNCTION),
        Import("bertq.errors", "bertq.cli", path, 4, TYPE_CHECKING_ONLY),
    ]
    downward = [Import(a, b, path, 5, MODULE_LEVEL) for a, b in zip(names[1:], names)]
    assert upward_imports(downward + upward, rank) == [
        "bertq/cli.py:3: bertq.workers.runner imports bertq.workers.worker inside a function: "
        "layer 'rows through a model' imports the later layer 'worker process'",
        "bertq/cli.py:4: bertq.errors imports bertq.cli for type checking only: "
        "layer 'base' imports the later layer 'producers'",
    ]
    edges = [
        Import("bertq.cli", "bertq.workers.worker", path, 6, IN_FUNCTION),  # a worker command's lazy import
        Import("bertq.cli", "bertq.workers.app", path, 7, MODULE_LEVEL),
        Import("bertq.cli", "bertq.workers.runner", path, 8, MODULE_LEVEL),
        Import("bertq.client", "bertq.workers.app", path, 9, MODULE_LEVEL),
        Import("bertq.client", "bertq.workers.queues.inbox", path, 10, IN_FUNCTION),
    ]
    assert [message.split(":")[1] for message in worker_imports(edges, {"bertq.cli", "bertq.client"})] == ["8", "10"]


def test_every_module_has_one_layer() -> None:
    found = modules()
    assert len(found) > 50 and "bertq.workers.worker" in found and "bertq.schemas" in found
    wrong = {name: [LAYERS[index][0] for index in layer_of(name)] for name in found if len(layer_of(name)) != 1}
    assert not wrong, f"every module needs exactly one layer in LAYERS (tests/test_layers.py); these have {wrong}"


def test_no_import_cycle() -> None:
    edges = graph()
    assert len(edges) > 100  # the reader found the package's imports
    found = cycles(edges)
    message = "\n\n".join(
        f"cycle {' -> '.join([cycle[0].source, *(edge.target for edge in cycle)])}:\n  "
        + "\n  ".join(str(edge) for edge in cycle)
        for cycle in found
    )
    assert not found, f"import cycles (function-level imports counted):\n{message}"


def test_layers_import_only_downward() -> None:
    upward = upward_imports(graph(), ranks(list(modules())))
    assert not upward, "imports against the layer order (LAYERS in tests/test_layers.py):\n" + "\n".join(upward)


def test_producers_reach_the_worker_only_lazily() -> None:
    producers = {name for name, layer in ranks(list(modules())).items() if layer == len(LAYERS) - 1}
    wrong = worker_imports(graph(), producers)
    assert not wrong, "producer modules that import the worker:\n" + "\n".join(wrong)


def test_no_module_over_max_lines() -> None:
    sizes = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in modules().values()}
    over = {path: lines for path, lines in sizes.items() if lines > MAX_LINES}
    assert len(sizes) > 50 and sizes["workers/worker.py"] > 0
    assert not over, f"modules over {MAX_LINES} lines: {over}"
