"""Layers point down (the house style, rule 17), checked on the source text: every module under ``src/cinematic`` is
parsed with ``ast``, never imported, so the test sees imports inside functions and under ``if TYPE_CHECKING:`` too.

1. The library never imports training, serving, evaluation, batch or the CLI: only a module inside ``cinematic.train``
   (``.serve``, ``.eval``) imports from it, and only the CLI (``cinematic.cli``, ``cinematic.__main__``) imports
   from all of them.
2. A private name (one leading underscore, not a dunder) stays in its module: no ``from cinematic.x import _y`` and no
   ``x._y`` on an imported cinematic module, from any other module.
3. No import cycle among cinematic modules: the strongly connected components of the import graph are single
   modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "cinematic"
UPPER = ("cinematic.train", "cinematic.serve", "cinematic.eval", "cinematic.batch", "cinematic.cli")
CLI = ("cinematic.cli", "cinematic.__main__")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the cinematic module imported (a package's __init__ counts as the package)
    names: tuple[str, ...]  # for ``from target import a, b``: the names that are not modules themselves
    line: int


def module_files() -> dict[str, Path]:
    """``{"cinematic.train.loop": path, "cinematic.train": path/__init__.py, ...}``."""
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


MODULES = module_files()


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name of ``from <node.module> import ...`` written in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def existing(name: str) -> str:
    """The longest prefix of ``name`` that is a cinematic module (``cinematic.x.y`` -> ``cinematic.x`` when y is an
    attribute of x)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts)


def imports(module: str, tree: ast.Module) -> Iterator[Import]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield Import(module, existing(alias.name), (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node)
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            names = []
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:  # ``from cinematic import video``: the module itself
                    yield Import(module, f"{source}.{alias.name}", (), node.lineno)
                else:
                    names.append(alias.name)
            if names:
                yield Import(module, existing(source), tuple(names), node.lineno)


def module_aliases(module: str, tree: ast.Module) -> dict[str, str]:
    """Local names bound to cinematic modules anywhere in the file: ``{"video": "cinematic.video", ...}``."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else PACKAGE
        elif isinstance(node, ast.ImportFrom):
            source = resolve(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    return aliases


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for an attribute chain on a plain name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def parsed() -> dict[str, ast.Module]:
    return {module: ast.parse(path.read_text(encoding="utf-8"), str(path)) for module, path in MODULES.items()}


TREES = parsed()
IMPORTS = [i for module, tree in TREES.items() for i in imports(module, tree)]


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_modules_found():
    assert {"cinematic", "cinematic.pipeline", "cinematic.train.loop", "cinematic.cli"} <= set(MODULES)
    assert len(IMPORTS) > 100


def upper_layer_offences(found: list[Import]) -> list[str]:
    offences = []
    for i in found:
        for upper in UPPER:
            if in_package(i.target, upper) and not in_package(i.module, upper) and i.module not in CLI:
                offences.append(f"{i.module} (line {i.line}) -> {i.target}")
    return offences


def private_name_offences(trees: dict[str, ast.Module], found: list[Import]) -> list[str]:
    offences = []
    for i in found:
        for name in i.names:
            if private(name) and i.target != i.module:
                offences.append(f"{i.module} (line {i.line}) imports {i.target}.{name}")
    for module, tree in trees.items():
        aliases = module_aliases(module, tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and private(node.attr)):
                continue
            chain = dotted(node.value)
            if chain is None or chain.split(".")[0] not in aliases:
                continue
            head, *rest = chain.split(".")
            target = ".".join([aliases[head], *rest])
            if target in MODULES and target != module:
                offences.append(f"{module} (line {node.lineno}) uses {target}.{node.attr}")
    return offences


# What the review of issue 21 found, written as one module would have it: each line must be caught.
OFFENDING = """
import cinematic.video
from cinematic import video as v
from cinematic.train.state import _prune
from cinematic.cli import main

def f():
    from cinematic.eval import judge
    return v._read_image, cinematic.video._atomic_file, judge._private, v.read, v.__name__
"""


def test_the_checks_catch_what_the_review_found():
    tree = ast.parse(OFFENDING)
    found = list(imports("cinematic.conditioning", tree))
    assert upper_layer_offences(found) == [
        "cinematic.conditioning (line 4) -> cinematic.train.state",
        "cinematic.conditioning (line 5) -> cinematic.cli",
        "cinematic.conditioning (line 8) -> cinematic.eval.judge",
    ]
    assert private_name_offences({"cinematic.conditioning": tree}, found) == [
        "cinematic.conditioning (line 4) imports cinematic.train.state._prune",
        "cinematic.conditioning (line 9) uses cinematic.video._read_image",
        "cinematic.conditioning (line 9) uses cinematic.video._atomic_file",
        "cinematic.conditioning (line 9) uses cinematic.eval.judge._private",
    ]
    # The CLI and a package's own modules may import the package; a module may use its own private names.
    assert not upper_layer_offences(list(imports("cinematic.cli", tree)))
    assert not upper_layer_offences([Import("cinematic.train.lora", "cinematic.train.state", ("x",), 1)])
    assert not private_name_offences({}, [Import("cinematic.video", "cinematic.video", ("_one_line",), 1)])


def test_library_does_not_import_upper_layers():
    offences = upper_layer_offences(IMPORTS)
    assert not offences, "imports of training, serving, evaluation or the CLI:\n" + "\n".join(offences)


def test_private_names_stay_in_their_module():
    offences = private_name_offences(TREES, IMPORTS)
    assert not offences, "private names used outside their module:\n" + "\n".join(offences)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one node, or a node that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    found.append(sorted(component))
    return found


def test_strongly_connected_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "d"}, "e": set()}
    assert sorted(strongly_connected(graph)) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles():
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for i in IMPORTS:
        if i.target != i.module:
            graph[i.module].add(i.target)
    cycles = strongly_connected(graph)
    report = []
    for component in cycles:
        members = set(component)
        edges = sorted(
            f"  {i.module} (line {i.line}) -> {i.target}"
            for i in IMPORTS
            if i.module in members and i.target in members
        )
        report.append(" <-> ".join(component) + "\n" + "\n".join(dict.fromkeys(edges)))
    assert not cycles, "import cycles among cinematic modules:\n" + "\n".join(report)
