"""The import arrows the README states, checked by an AST scan of edgemoe/ (and no import cycles in edgemoe/ or tools/).

Every import counts, those inside functions too: a lazy import is still an arrow, and a cycle hidden
behind one is still a cycle. The layers are read from the README's line "Imports point one way:
`a -> b/c -> ...`", so the test and the README cannot disagree; edgemoe/__init__.py (the version) is
importable from every layer and imports nothing of the package; edgemoe/__main__.py is the top layer's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_ARROWS = re.compile(r"Imports point one way: `([^`]+)`")


def layers_of(readme: str) -> list[set[str]]:
    """The README's layers, top first: `cli -> bench/serve -> ...` -> [{"cli"}, {"bench", "serve"}, ...]."""
    m = _ARROWS.search(readme)
    if m is None:
        raise ValueError("the README states no import arrows (Imports point one way: `...`)")
    return [set(part.strip().split("/")) for part in m.group(1).split("->")]


def module_name(root: Path, path: Path) -> str:
    """edgemoe/predict/base.py -> edgemoe.predict.base; edgemoe/predict/__init__.py -> edgemoe.predict."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module of `known` that `module`'s source imports, at any depth of the syntax tree.
    `from pkg import name` is an arrow to pkg.name where that is a module, else to pkg."""
    out: set[str] = set()
    tree = ast.parse(source)
    # imports under `if TYPE_CHECKING:` exist for type checkers only: no arrow at run time
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                pkg = ".".join(base + ([node.module] if node.module else []))
            else:
                pkg = node.module or ""
            targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in known else pkg for a in node.names]
        else:
            continue
        for t in targets:
            # `import a.b.c` of a module we do not scan: its longest scanned prefix
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module:
                out.add(t)
    return out


def import_graph(root: Path, sources: dict[Path, str] | None = None) -> dict[str, set[str]]:
    """module -> the modules under root it imports. sources: {path: text} instead of the files (for tests)."""
    files = sources if sources is not None else {p: p.read_text() for p in sorted(root.rglob("*.py"))}
    names = {module_name(root, p): p for p in files}
    return {m: imports_of(files[p], m, p.name == "__init__.py", set(names)) for m, p in names.items()}


def layer_violations(graph: dict[str, set[str]], layers: list[set[str]], top: str = "edgemoe") -> list[str]:
    """Arrows that go up or sideways between the layers (a module's layer: its first name under `top`)."""
    rank = {name: i for i, group in enumerate(layers) for name in group}
    rank.setdefault("__main__", -1)  # `python -m edgemoe`: above the command line it runs
    bad = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = (m.split(".")[1] if m.count(".") else "" for m in (src, dst))
            if src == top:
                bad.append(f"{src} -> {dst}: {top}/__init__.py imports nothing of the package")
            elif not b or a == b:
                continue  # into the package root (the version), or within one part
            elif a not in rank or b not in rank:
                bad.append(f"{src} -> {dst}: {a if a not in rank else b} is in no layer of the README")
            elif rank[a] >= rank[b]:
                bad.append(f"{src} -> {dst}: {a} may not import {b}")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# -- the checker, on snippets -------------------------------------------------------------------

_LAYERS = layers_of("Imports point one way: `cli -> model -> util`.")


def _graph(files: dict[str, str]) -> dict[str, set[str]]:
    root = Path("/x/edgemoe")
    return import_graph(root, {root.parent / p: src for p, src in files.items()})


def test_checker_reads_the_readme_line() -> None:
    assert _LAYERS == [{"cli"}, {"model"}, {"util"}]
    assert layers_of("x\nImports point one way: `cli -> bench/serve -> model`.\n") == [{"cli"}, {"bench", "serve"}, {"model"}]
    with pytest.raises(ValueError):
        layers_of("no arrows here")


def test_checker_passes_downward_arrows() -> None:
    g = _graph({"edgemoe/__init__.py": "", "edgemoe/cli/__init__.py": "", "edgemoe/cli/main.py": "from edgemoe import x\nimport edgemoe.model.a",
                "edgemoe/model/__init__.py": "", "edgemoe/model/a.py": "from edgemoe.util import b\nfrom . import c",
                "edgemoe/model/c.py": "", "edgemoe/util/__init__.py": "", "edgemoe/util/b.py": "import numpy"})
    assert g["edgemoe.model.a"] == {"edgemoe.util.b", "edgemoe.model.c"} and g["edgemoe.cli.main"] == {"edgemoe", "edgemoe.model.a"}
    assert layer_violations(g, _LAYERS) == []
    assert cycles(g) == []


def test_checker_fails_on_a_wrong_arrow() -> None:
    """An upward arrow hidden in a function, one into a part no layer names, and the root importing the package."""
    g = _graph({"edgemoe/__init__.py": "import edgemoe.util.b", "edgemoe/model/__init__.py": "",
                "edgemoe/model/a.py": "def f():\n    from edgemoe.cli.main import run\n",
                "edgemoe/cli/__init__.py": "", "edgemoe/cli/main.py": "from edgemoe.extra import y",
                "edgemoe/extra.py": "", "edgemoe/util/__init__.py": "", "edgemoe/util/b.py": ""})
    assert layer_violations(g, _LAYERS) == [
        "edgemoe -> edgemoe.util.b: edgemoe/__init__.py imports nothing of the package",
        "edgemoe.cli.main -> edgemoe.extra: extra is in no layer of the README",
        "edgemoe.model.a -> edgemoe.cli.main: model may not import cli",
    ]


def test_checker_fails_on_a_sideways_arrow_and_a_lazy_cycle() -> None:
    g = _graph({"edgemoe/bench/__init__.py": "", "edgemoe/serve/__init__.py": "",
                "edgemoe/bench/a.py": "from edgemoe.serve import b", "edgemoe/serve/b.py": "",
                "edgemoe/model/__init__.py": "", "edgemoe/model/x.py": "from edgemoe.model.y import f",
                "edgemoe/model/y.py": "def g():\n    from .x import h\n"})
    assert layer_violations(g, [{"bench", "serve"}, {"model"}]) == ["edgemoe.bench.a -> edgemoe.serve.b: bench may not import serve"]
    assert cycles(g) == [["edgemoe.model.x", "edgemoe.model.y"]]


# -- the tree -----------------------------------------------------------------------------------


def test_edgemoe_imports_point_the_way_the_readme_says() -> None:
    layers = layers_of((REPO / "README.md").read_text())
    graph = import_graph(REPO / "edgemoe")
    parts = {m.split(".")[1] for m in graph if m.count(".")} - {"__main__"}
    assert parts <= set().union(*layers), f"parts of edgemoe/ in no layer of the README: {parts - set().union(*layers)}"
    assert layer_violations(graph, layers) == []
    # the arrows the README has always stated are among them
    rank = {n: i for i, g in enumerate(layers) for n in g}
    assert rank["cli"] < rank["bench"] < rank["cluster"] <= rank["predict"] < rank["model"] < rank["ggml"] == rank["format"]


def test_no_import_cycles() -> None:
    for root in (REPO / "edgemoe", REPO / "tools"):
        assert cycles(import_graph(root)) == [], root


def outside_imports(source: str, names: tuple[str, ...]) -> list[str]:
    """The imports of a source whose top-level package is one of names (`line: module`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        found += [f"{node.lineno}: {m}" for m in mods if m.split(".")[0] in names]
    return sorted(found)


def test_edgemoe_never_imports_tools_or_tests() -> None:
    assert outside_imports("import numpy\ndef f():\n    from tools.convert import write_model\n", ("tools", "tests")) == [
        "3: tools.convert"]
    bad = {str(p.relative_to(REPO)): found for p in sorted((REPO / "edgemoe").rglob("*.py"))
           if (found := outside_imports(p.read_text(), ("tools", "tests")))}
    assert bad == {}


def test_only_edgemoe_is_installed() -> None:
    """pyproject's package discovery finds edgemoe and its subpackages, never tools/ or tests/ (which
    would land in site-packages as top-level `tools` and `tests`)."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = find_packages(where=str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "edgemoe" in found and "edgemoe.convert" in found
    assert [p for p in found if p.split(".")[0] != "edgemoe"] == []


def test_type_checking_imports_are_no_arrows() -> None:
    known = {"pkg.a", "pkg.b"}
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import X\n"
    assert imports_of(src, "pkg.a", False, known) == set()
    assert imports_of(src.replace("if TYPE_CHECKING:", "if True:"), "pkg.a", False, known) == {"pkg.b"}
