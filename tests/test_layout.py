"""The layout's rules (docs/architecture.md), read from the source: imports run one way, no module imports one that
imports it, the library never imports the bench or the interfaces, and no function is over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "megamem"
MAX_LINES = 80
# what sits above the library: the library (every other module) never imports these
ABOVE = (
    "megamem.bench",
    "megamem.cli",
    "megamem.server",
    "megamem.ops",
    "megamem.entry",
    "megamem.__main__",
    "megamem.demo",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    """Whether an import stands under `if TYPE_CHECKING:` (for type hints only: never run)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str) -> set[str]:
    """The megamem modules a module imports, at the top or inside a function (type-checking-only ones left out)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        if _type_checking_only(node, parents):
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imports(name) for name in MODULES}


def test_no_module_imports_one_that_imports_it():
    """No circles: the import graph is acyclic (a depth-first search finds no back edge)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(GRAPH[name]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def _above(name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in ABOVE)


def test_the_library_never_imports_the_bench_or_the_interfaces():
    bad = [(name, dep) for name, deps in GRAPH.items() if not _above(name) for dep in deps if _above(dep)]
    assert bad == [], bad


def test_the_server_never_imports_the_command_line():
    bad = [(n, d) for n, deps in GRAPH.items() if n.startswith("megamem.server") for d in deps if "cli" in d]
    assert bad == []


def test_no_function_is_over_80_lines():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], long


def test_the_rules_see_the_imports_they_check():
    """The reader itself: it finds a relative import, a lazy import and skips a TYPE_CHECKING one."""
    assert "megamem.answer" in GRAPH["megamem.memory"]  # from .answer import ...
    assert "megamem.memoryllm.store" in GRAPH["megamem.memory"]
    assert "megamem.inject" in GRAPH["megamem.ops.distributed"]  # imported inside a method
    assert "megamem.memory" not in GRAPH["megamem.ops.merge"]  # under TYPE_CHECKING only
