"""Imports point down the layers only, and no module imports itself back through others.

The layers, bottom to top: errors, paths, textio -> models -> chat basics (messages, templates,
personas) -> decoding -> chat sessions -> data -> training, eval -> serve -> cli, the Python entry point
(`dialogen.load`, api.py) and export.py. Every import is
walked, those inside functions included. The edges and cycles still to be undone are listed;
the list may only shrink (a listed one that is gone fails the test too, so it gets deleted).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dialogen"

KNOWN_UPWARD: set[tuple[str, str]] = set()  # (importer, imported) still to move: none left
KNOWN_CYCLES: set[frozenset] = set()


def layer(module: str) -> int:
    parts = module.split(".")
    if module in ("dialogen", "dialogen.cli", "dialogen.__main__", "dialogen.api", "dialogen.export"):
        return 8  # the front doors: the command line, and dialogen.load() (the package imports it lazily)
    top = parts[1] if len(parts) > 1 else ""
    if top == "chat":
        return 2 if parts[2] in ("messages", "templates", "personas", "toolformat", "functions") else 4
    return {"models": 1, "decoding": 3, "data": 5, "training": 6, "eval": 6, "serve": 7}.get(top, 0)


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules that `name` imports, anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> set[frozenset]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), set(), [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    group.add(w)
                    if w == v:
                        break
                if len(group) > 1:
                    out.add(frozenset(group))
    return out


def test_imports_point_down_and_do_not_cycle():
    edges = graph()
    upward = {(a, b) for a, bs in edges.items() for b in bs if layer(b) > layer(a)}
    assert upward - KNOWN_UPWARD == set(), "new upward imports"
    assert KNOWN_UPWARD - upward == set(), "undone: delete them from KNOWN_UPWARD"
    found = cycles(edges)
    assert found - KNOWN_CYCLES == set(), "new import cycles"
    assert KNOWN_CYCLES - found == set(), "undone: delete them from KNOWN_CYCLES"


def test_the_walk_finds_what_it_should():
    """The checker itself: a cycle and an upward edge in a made-up graph are found."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    edges = graph()
    assert "dialogen.models.transformer" in edges["dialogen.models.loading"]  # a module-level import
    assert "dialogen.models.rnn" in edges["dialogen.models.loading"]  # one inside a function
    assert layer("dialogen.serve.app") > layer("dialogen.decoding.generate") > layer("dialogen.models.rnn")
