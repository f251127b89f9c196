"""The layering of docs/design.md, "Layers", read from the source with ``ast``: every import
statement (at module level or inside a function), every ``importlib.import_module("...")``,
``__import__`` or ``find_spec`` of a literal name, and every ``"package.module:attr"`` string
(the form lazy re-export tables use) counts as a dependency.

The rules:

* packages depend downwards only: library (``fedcoe_edge``) <- ``export`` <- ``device_agent``
  <- ``coordinator`` (its test harness embeds agents) <- ``benchmarks``;
* inside ``fedcoe_edge`` the app shell (``cli``, ``commands``) is the top: it is the only part
  that may name the packages above the library (it assembles the ``fedcoe`` command), and no
  library module imports it;
* the device runtime and bundle modules, and wire and transport, never import the learning
  core (they run on the torch-free install profile); wire and transport never import the
  runtime;
* no import cycle among ``fedcoe_edge`` modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# packages in dependency order: each may import those before it, never those after
PACKAGES = ("fedcoe_edge", "export", "device_agent", "coordinator", "benchmarks")
APP = ("fedcoe_edge.cli", "fedcoe_edge.commands")
RUNTIME = ("fedcoe_edge.bundle_format", "fedcoe_edge.bundle_io", "fedcoe_edge.bundle_sig",
           "fedcoe_edge.runtime", "fedcoe_edge.fused", "fedcoe_edge.moe_numpy",
           "fedcoe_edge.onnx_heads")
WIRE = ("fedcoe_edge.wire", "fedcoe_edge.transport", "fedcoe_edge.protocol", "fedcoe_edge.messages",
        "fedcoe_edge.broker")
BASE = ("fedcoe_edge.errors", "fedcoe_edge.io", "fedcoe_edge.config", "fedcoe_edge.registry")
# Known cycles, each to be removed (never added to); none today. The test fails once a listed
# cycle is gone, so its entry goes too.
KNOWN_CYCLES: set[frozenset[str]] = set()
# strings name a module to be loaded later; they count for the layer rules, but a registry
# entry naming its built-in implementation ("fedcoe_edge.model:mlp_expert") is late binding
# inside the library, not an import cycle
STRING_KINDS = ("'module:attr' string", "module-name string")
IMPORTERS = {"import_module", "__import__", "find_spec"}


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> str:
    """A fedcoe_edge module's layer: app, runtime, wire, base or core (the learning core)."""
    for name, prefixes in (("app", APP), ("runtime", RUNTIME), ("wire", WIRE), ("base", BASE)):
        if within(module, prefixes):
            return name
    return "core"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of nodes inside ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports(module: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int, str]]:
    """(imported module, line, how) for every dependency of ``module`` on our packages."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    skip = _type_checking_only(tree)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        how = "import"
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*parent, *([base] if base else [])])
            names = [base] + [f"{base}.{a.name}" for a in node.names
                              if f"{base}.{a.name}" in known]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in IMPORTERS and isinstance(node.args[0].value, str):
                names, how = [node.args[0].value], f"{fname}() string"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # a module named by a string, to be imported later: "pkg.module" (a list of
            # modules to load) or "pkg.module:attr" (a lazy re-export or registry entry)
            target = node.value.split(":", 1)[0]
            if target in known and "." in target and (":" in node.value or target == node.value):
                names = [target]
                how = "'module:attr' string" if ":" in node.value else "module-name string"
        for name in names:
            if name.split(".")[0] in PACKAGES and name != module:
                yield name, getattr(node, "lineno", 0), how


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int, str]]]:
    known = modules()
    return {m: sorted(set(imports(m, p, known))) for m, p in known.items()}


def test_the_graph_sees_imports_of_every_kind(graph: dict[str, list[tuple[str, int, str]]],
                                              tmp_path: Path) -> None:
    """The parser must find what it is meant to find, or every rule below passes vacuously."""
    cli = {name for name, _, _ in graph["fedcoe_edge.cli"]}
    assert "export.cli" in cli and "coordinator.cli" in cli  # import_module() strings
    agent = {name for name, _, _ in graph["device_agent.daemon"]}
    assert {"export.bundle", "fedcoe_edge.runtime", "fedcoe_edge.wire"} <= agent  # lazy and top
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nimport importlib\n"
                   "if TYPE_CHECKING:\n    import benchmarks.fleet\n"
                   "LAZY = {'Coordinator': 'coordinator.daemon:Coordinator'}\n"
                   "def f():\n    from . import runtime\n"
                   "    return importlib.import_module('device_agent.daemon')\n")
    found = {(name, how) for name, _, how in imports("fedcoe_edge.mod", src, modules())}
    assert found == {("coordinator.daemon", "'module:attr' string"), ("fedcoe_edge", "import"),
                     ("fedcoe_edge.runtime", "import"),
                     ("device_agent.daemon", "import_module() string"),
                     ("device_agent.daemon", "module-name string")}, found
    assert len(graph) > 100


def test_packages_depend_downwards_only(graph: dict[str, list[tuple[str, int, str]]]) -> None:
    bad = []
    for module, deps in graph.items():
        rank = PACKAGES.index(module.split(".")[0])
        for name, line, how in deps:
            if within(module, APP):
                continue  # the app shell assembles the command from every package
            if PACKAGES.index(name.split(".")[0]) > rank:
                bad.append(f"{module}:{line} imports {name} ({how})")
    assert not bad, "an import against the layers (docs/design.md, Layers):\n" + "\n".join(bad)


def test_nothing_imports_the_app_shell(graph: dict[str, list[tuple[str, int, str]]]) -> None:
    """Outside the library a module may still *run* the command (``-m fedcoe_edge.cli`` in a
    subprocess's argv: a module-name string), as a user would; it may not import it."""
    bad = [f"{m}:{line} imports {name} ({how})" for m, deps in graph.items()
           for name, line, how in deps
           if not within(m, APP) and within(name, APP)
           and (m.startswith("fedcoe_edge") or how != "module-name string")]
    assert not bad, "\n".join(bad)


def test_runtime_and_wire_stay_off_the_learning_core(
        graph: dict[str, list[tuple[str, int, str]]]) -> None:
    """Also: the base modules import only each other (the registry names its built-in
    factories by import path, resolved on use: late binding, not an import)."""
    allowed = {"runtime": {"runtime", "base"}, "wire": {"wire", "base"}, "base": {"base"}}
    bad = []
    for module, deps in graph.items():
        if not module.startswith("fedcoe_edge.") or layer_of(module) not in allowed:
            continue
        for name, line, how in deps:
            if layer_of(module) == "base" and how in STRING_KINDS:
                continue
            if name.startswith("fedcoe_edge.") and layer_of(name) not in allowed[layer_of(module)]:
                bad.append(f"{module}:{line} ({layer_of(module)}) imports {name} "
                           f"({layer_of(name)}, {how})")
    assert not bad, "\n".join(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_library(graph: dict[str, list[tuple[str, int, str]]]) -> None:
    edges: dict[str, set[str]] = {}
    for module, deps in graph.items():
        if module.startswith("fedcoe_edge"):
            # a package's __init__ re-exporting its own submodules is not a cycle with them
            edges[module] = {n for n, _, how in deps if n.startswith("fedcoe_edge")
                             and how not in STRING_KINDS
                             and not (n.startswith(module + ".") or module.startswith(n + "."))}
    found = {frozenset(c) for c in cycles(edges)}
    assert not found - KNOWN_CYCLES, f"import cycles among fedcoe_edge modules: {found - KNOWN_CYCLES}"
    assert not KNOWN_CYCLES - found, (f"{KNOWN_CYCLES - found} no longer cycle: remove them from "
                                      "KNOWN_CYCLES in tests/test_layers.py")
