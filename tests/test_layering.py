"""The package layout is the architecture: imports go one way, and there are no circles.

Read from the source (every ``import`` statement, lazy ones inside functions included), so a
forbidden edge fails here before anyone runs the code that would take it.

Layers, lowest first. The core never imports a host, the demo world, the UI, the webui glue or
the CLI; inside the core each package imports only the ones before it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "lib"
PACKAGE = LIB / "pivotal"

#: The core, in order: a package may import itself and those before it.
CORE = ("errors", "text", "adapters", "formats", "host_api", "data", "training", "inference")
#: Above the core: what each may import besides the core.
UPPER = {
    "hosts": {"hosts"},
    "demo": {"hosts", "demo"},
    "ui": {"hosts", "demo", "ui"},
    "webui": {"hosts", "ui", "webui"},
    "cli": {"hosts", "demo", "ui", "cli"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported pivotal module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
            found += [(node.lineno, n if _is_module(n) else base) for n in names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m == "pivotal" or m.startswith("pivotal.")]


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split("."))
    return (LIB / rel).with_suffix(".py").is_file() or (LIB / rel / "__init__.py").is_file()


def area(module: str) -> str:
    """The layer a module belongs to: ``pivotal.training.step`` -> ``training``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "pivotal"


def allowed(src: str, dst: str) -> bool:
    if dst == "pivotal":  # the package itself (its __version__)
        return True
    if src in CORE:
        return dst in CORE and CORE.index(dst) <= CORE.index(src)
    if src == "pivotal":
        return False
    return dst in CORE or dst in UPPER[src]


def graph() -> dict[str, list[tuple[int, str]]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_package_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    unknown = (folders | modules) - set(CORE) - set(UPPER)
    assert not unknown, f"give these a place in the layers of this test: {sorted(unknown)}"


def test_imports_go_one_way() -> None:
    bad = []
    for module, edges in graph().items():
        for line, target in edges:
            if not allowed(area(module), area(target)):
                bad.append(f"{module}:{line} imports {target} ({area(module)} -> {area(target)})")
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_no_import_circles() -> None:
    g = {m: {t for _, t in edges if t != m} for m, edges in graph().items()}
    cycles = _cycles(g)
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in g:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(g[nxt]))))
                elif nxt in on_stack:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


@pytest.mark.parametrize("src, dst, ok", [
    ("training", "adapters", True), ("adapters", "training", False), ("formats", "hosts", False),
    ("training", "demo", False), ("hosts", "demo", False), ("demo", "hosts", True), ("webui", "cli", False),
    ("text", "text", True), ("errors", "text", False),
])
def test_the_rule_itself(src: str, dst: str, ok: bool) -> None:
    assert allowed(src, dst) is ok


def test_the_circle_finder_finds_circles() -> None:
    assert sorted(map(sorted, _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}))) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
