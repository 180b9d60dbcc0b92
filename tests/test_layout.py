"""The package's shape (issue 9): only the CLI prints, and no module imports back into a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "istio_init"
THE_CLI = PACKAGE / "cli.py"
# The CLI's two modules: cli.py (click) and entry.py, its click-free front door for Istio's flag list.
PRINTERS = ("istio_init.cli", "istio_init.entry")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _writes_output(tree: ast.Module) -> list[str]:
    """Every print(), click.echo() and sys.stdout/sys.stderr use in a module, as 'line N: what'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            found.append(f"line {node.lineno}: print()")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                (node.value.id == "sys" and node.attr in ("stdout", "stderr"))
                or (node.value.id == "click" and node.attr in ("echo", "secho"))):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_only_the_cli_prints() -> None:
    offenders = {name: hits for name, tree in _modules().items()
                 if name not in PRINTERS and (hits := _writes_output(tree))}
    assert offenders == {}, "only the CLI (cli.py, entry.py) may print; return text or log through the CLI's log()"


def test_the_guard_finds_the_cli_printing() -> None:
    """The scan above can fail: it sees the CLI's own output calls."""
    assert _writes_output(ast.parse(THE_CLI.read_text()))


def _imports(name: str, tree: ast.Module) -> set[str]:
    """istio_init modules `name` imports anywhere (functions included), except under TYPE_CHECKING."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for child in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("istio_init"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("istio_init")}
    return found - {name}


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: {m for m in _imports(name, tree) if m in modules} for name, tree in modules.items()}
    seen: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for start in sorted(graph):
        if start not in seen:
            visit(start, [start])
    assert cycles == []
