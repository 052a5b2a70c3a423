"""The package's import structure, read from the source with `ast` (nothing is imported).

- `edge_llm/server/` has no import circle. Every import counts: module level, inside functions, and
  under `if TYPE_CHECKING:` too (a type-only circle is still two modules that each need the other;
  hiding one side under TYPE_CHECKING is how the last circle went unnoticed).
- API route modules (`*_routes.py`) depend only downward: no route module imports another, and only
  `app.py`, the top that assembles them, imports a route module.
- The commands (`edge_llm/commands/`) sit on top of the core: only `cli.py` and the commands
  themselves import them.
- No module of `edge_llm` takes a private name (`_name`) from another of its modules, by
  `from m import _name` or `m._name`: a name shared between modules is public.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "edge_llm"
SERVER = "edge_llm.server"
TOP = f"{SERVER}.app"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def absolute(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The module a `from ... import` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package(path) else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(tree: ast.AST, module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` this source imports anywhere in it. `from pkg import name` imports the
    submodule `pkg.name` when there is one, else `pkg` itself (its __init__)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            source = absolute(node, module, path)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:
                    out.add(sub)
                elif source in known:
                    out.add(source)
    out.discard(module)
    return out


def import_graph(prefix: str) -> dict[str, set[str]]:
    modules = {name: path for name, path in package_modules().items()
               if name == prefix or name.startswith(prefix + ".")}
    known = set(modules)
    return {name: imported_modules(ast.parse(path.read_text("utf-8")), name, path, known)
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found:
                return found
    return None


def is_route_module(name: str) -> bool:
    return name.startswith(SERVER + ".") and name.endswith("_routes")


def test_find_cycle_names_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_reads_every_kind_of_import(tmp_path):
    source = ("from typing import TYPE_CHECKING\n"
              "from edge_llm.server import jsonio, create_app\n"
              "from . import limits\n"
              "if TYPE_CHECKING:\n    from edge_llm.server.models import Lease\n"
              "def f():\n    import edge_llm.server.media\n")
    path = PACKAGE_ROOT / "server" / "example.py"
    known = {"edge_llm.server", "edge_llm.server.jsonio", "edge_llm.server.limits",
             "edge_llm.server.models", "edge_llm.server.media"}
    assert imported_modules(ast.parse(source), "edge_llm.server.example", path, known) == known


def test_server_has_no_import_circle():
    cycle = find_cycle(import_graph(SERVER))
    assert cycle is None, "import circle in edge_llm/server: " + " -> ".join(cycle)


def test_routes_depend_only_downward():
    graph = import_graph(SERVER)
    assert any(is_route_module(name) for name in graph)
    wrong = sorted(f"{importer} imports {route}" for importer, imports in graph.items()
                   for route in imports if is_route_module(route) and importer != TOP)
    assert not wrong, "only server/app.py assembles the route modules: " + "; ".join(wrong)


COMMANDS = "edge_llm.commands"


def test_only_the_cli_imports_the_commands():
    graph = import_graph("edge_llm")
    commands = {name for name in graph if name == COMMANDS or name.startswith(COMMANDS + ".")}
    assert len(commands) > 5
    wrong = sorted(f"{importer} imports {command}" for importer, imports in graph.items()
                   if importer not in commands and importer != "edge_llm.cli"
                   for command in imports & commands)
    assert not wrong, "the core does not depend on the commands: " + "; ".join(wrong)


def private_uses(tree: ast.AST, module: str, path: Path, modules: set[str]) -> list[str]:
    """`from m import _x` and `m._x` where m is another module of edge_llm (dunders are fine)."""

    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    found = []
    aliases: dict[str, str] = {}  # local name -> the edge_llm module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = absolute(node, module, path)
            if source != module and source in modules:
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                    elif private(alias.name):
                        found.append(f"{module}:{node.lineno} from {source} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in modules:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            target = node.value
            dotted = []
            while isinstance(target, ast.Attribute):
                dotted.insert(0, target.attr)
                target = target.value
            if isinstance(target, ast.Name):
                owner = ".".join([aliases.get(target.id, target.id), *dotted])
                if owner in modules and owner != module:
                    found.append(f"{module}:{node.lineno} {owner}.{node.attr}")
    return found


def test_private_use_detection():
    source = ("from edge_llm.server.app import _version\n"
              "from edge_llm.server import app\n"
              "import edge_llm.server.app as top\n"
              "from edge_llm.server.app import __all__, create_app\n"
              "from edge_llm.server.models import _own\n"
              "x = app._version, top._version, app.__name__, app.create_app\n")
    modules = {"edge_llm.server", "edge_llm.server.app", "edge_llm.server.models"}
    found = private_uses(ast.parse(source), "edge_llm.server.models", PACKAGE_ROOT / "server" / "models.py", modules)
    assert [f.split(" ", 1)[1] for f in found] == ["from edge_llm.server.app import _version",
                                                    "edge_llm.server.app._version", "edge_llm.server.app._version"]


def test_no_private_names_across_modules():
    modules = package_modules()
    found = [use for name, path in modules.items()
             for use in private_uses(ast.parse(path.read_text("utf-8")), name, path, set(modules))]
    assert not found, "private names used outside their module (make them public or move them): " + "; ".join(found)
