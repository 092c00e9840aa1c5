"""The package's shape, read from its source: no import cycle (lazy imports count), the loop imports
no subscriber and no bridge, the bridge imports no subscriber, Lightning is imported only under
`adapters/`, and modules stay short."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"nntrain": ROOT / "nntrain", "nntrain.adapters": ROOT / "adapters"}
LOOP = ("nntrain.events", "nntrain.dispatch", "nntrain.engines", "nntrain.learner")
MAX_LINES = 450  # "about 400"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (the bridge as `nntrain.adapters`)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if package == "nntrain" and "adapters" in path.relative_to(folder).parts:
                continue  # a development link to adapters/
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module `path` imports at run time, at the top or inside functions (not the names a
    `if TYPE_CHECKING:` block imports for type checkers). `from package import module` imports
    the module (and runs the package's `__init__`, which imports lazily)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    known = set(modules())
    names = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            names |= submodules if submodules else {node.module}
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {m for m in imports(path) if m in mods and m != name} for name, path in mods.items()}


def test_no_import_cycle():
    edges = graph()
    # a package's __init__ re-exporting its modules is not a cycle of the code's design
    edges = {name: {m for m in targets if not (m == name.rsplit(".", 1)[0] and m in PACKAGES)}
             for name, targets in edges.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_the_loop_imports_no_subscriber_and_no_bridge_and_the_bridge_no_subscriber():
    edges = graph()
    for name in LOOP:
        bad = {m for m in edges[name] if m.startswith(("nntrain.subscribers", "nntrain.adapters"))}
        assert not bad, f"{name} imports {bad}"
    for name, targets in edges.items():
        if name.startswith("nntrain.adapters"):
            assert not {m for m in targets if m.startswith("nntrain.subscribers")}, f"{name} imports a subscriber"


def test_lightning_is_imported_only_under_adapters():
    for name, path in modules().items():
        if not name.startswith("nntrain.adapters"):
            heavy = {m for m in imports(path) if m.split(".")[0] in ("lightning", "pytorch_lightning")}
            assert not heavy, f"{name} imports {heavy}"


def test_modules_stay_short():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
