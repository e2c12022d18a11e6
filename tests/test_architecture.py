"""The import graph that mmscale/ARCHITECTURE.md promises, read from the source with ast (nothing is imported).

- module-level imports form no cycle (a lazy import inside a function is not an edge of that graph, but every
  import counts for the forbidden arrows);
- the arrows that must never exist do not;
- no module imports another module's private (_underscore) name.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mmscale"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_statements(body):
    """Statements that run at import: the body, and the bodies of top-level if/try/with (not TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _top_level_statements(node.body)
                yield from _top_level_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _top_level_statements(part)
        elif isinstance(node, ast.With):
            yield from _top_level_statements(node.body)
        else:
            yield node


def _targets(node, here: str) -> list[tuple[str, list[str]]]:
    """[(module imported, names taken from it)] for an import statement, mmscale modules only."""
    out = []
    if isinstance(node, ast.Import):
        out = [(a.name, []) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = here.split(".") if MODULES[here].name == "__init__.py" else here.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        for a in node.names:
            sub = f"{base}.{a.name}"
            out.append((sub, []) if sub in MODULES else (base, [a.name]))
    return [(m, names) for m, names in out if m == "mmscale" or m.startswith("mmscale.")]


def _imports(name: str):
    """(module-level edges, all edges, private names taken) of one module."""
    tree = ast.parse(MODULES[name].read_text())
    top = {id(n) for n in _top_level_statements(tree.body)}
    level, every, private = set(), set(), []
    for node in ast.walk(tree):
        for mod, names in _targets(node, name):
            while mod not in MODULES:  # `import mmscale.a.b` names a package attribute path
                mod = mod.rsplit(".", 1)[0]
            every.add(mod)
            if id(node) in top:
                level.add(mod)
            private += [f"{mod}.{n}" for n in names if n.startswith("_") and not n.startswith("__")
                        and mod != name]
    return level, every, private


GRAPH = {name: _imports(name) for name in MODULES}


def _in(mod: str, *packages: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def test_the_graph_is_read():
    # the reader itself: a few edges every version of mmscale has, so an empty graph cannot pass
    assert len(MODULES) > 40
    assert "mmscale.config" in GRAPH["mmscale.run.train"][0]
    assert "mmscale.models" in GRAPH["mmscale.run.train"][1] or "mmscale.models" in GRAPH["mmscale.run.train"][0]


def test_module_level_imports_have_no_cycle():
    edges = {m: GRAPH[m][0] - {m} for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            # a package's __init__ importing its own submodules, and a submodule importing its package's
            # __init__, are one unit: Python runs the package first
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


ARROWS = [  # (from these packages, never to these), as ARCHITECTURE.md's "Arrows that must never exist"
    (("mmscale.models",), ("mmscale.engines", "mmscale.data", "mmscale.run", "mmscale.train", "mmscale.cli",
                           "mmscale.launch", "mmscale.experiment", "mmscale.retrieval", "mmscale.export")),
    (("mmscale.data",), ("mmscale.models", "mmscale.run", "mmscale.train", "mmscale.engines")),
    (("mmscale.engines",), ("mmscale.run", "mmscale.train", "mmscale.launch", "mmscale.cli",
                            "mmscale.experiment")),
    (("mmscale.run",), ("mmscale.cli", "mmscale.experiment")),
    (("mmscale.retrieval", "mmscale.export", "mmscale.engines", "mmscale.models", "mmscale.data"),
     ("mmscale.experiment",)),
]


@pytest.mark.parametrize("sources,targets", ARROWS, ids=[a[0][0].split(".")[1] for a in ARROWS])
def test_forbidden_arrows(sources, targets):
    bad = sorted(f"{m} -> {t}" for m, (_, every, _) in GRAPH.items() if _in(m, *sources)
                 for t in every if _in(t, *targets))
    assert not bad, "forbidden imports (ARCHITECTURE.md): " + ", ".join(bad)


def test_config_imports_only_errors():
    assert GRAPH["mmscale.config"][1] <= {"mmscale.errors"}, GRAPH["mmscale.config"][1]


def test_no_private_name_is_imported_across_modules():
    bad = sorted(p for m, (_, _, private) in GRAPH.items() for p in private)
    assert not bad, "private names imported from other modules: " + ", ".join(bad)


def test_a_forbidden_arrow_is_caught(tmp_path, monkeypatch):
    """The checks can fail: a models module that imports the loop, and a two-module cycle, on a copy."""
    src = "from mmscale.run.train import train\n"
    name = "mmscale.models._probe"
    MODULES[name] = tmp_path / "_probe.py"
    MODULES[name].write_text(src)
    try:
        level, every, _ = _imports(name)
        assert "mmscale.run.train" in every
        monkeypatch.setitem(GRAPH, name, (level, every, []))
        with pytest.raises(AssertionError, match="mmscale.models._probe -> mmscale.run.train"):
            test_forbidden_arrows(*ARROWS[0])
        monkeypatch.setitem(GRAPH, "mmscale.errors", (GRAPH["mmscale.errors"][0] | {name}, set(), []))
        monkeypatch.setitem(GRAPH, name, ({"mmscale.errors"}, set(), []))
        with pytest.raises(AssertionError, match="import cycles"):
            test_module_level_imports_have_no_cycle()
    finally:
        del MODULES[name]
