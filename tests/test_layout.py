"""The package's shape: only the front doors print, no import cycle, no module imports a layer above its
own, and what is installed is read for the commands by one module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "istio_init"
THE_CLI = PACKAGE / "cli.py"
# The front doors (click and click-free) and the output layer they share.
PRINTERS = ("istio_init.cli", "istio_init.entry", "istio_init.frontdoor")


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _writes_stdout(tree: ast.Module) -> list[str]:
    """Every way a module writes to stdout, as 'line N: what'.

    print() without a file= (or with file=sys.stdout), click.echo() without
    err=True, and any use of sys.stdout. Writing to stderr is fine anywhere
    the CLI's log stream is set up (logs.py); stdout is the rules' text only.
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and func.id == "print":
                target = keywords.get("file")
                if target is None or ast.unparse(target) == "sys.stdout":
                    found.append(f"line {node.lineno}: print()")
            elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                  and func.value.id == "click" and func.attr in ("echo", "secho")):
                err = keywords.get("err")
                if not (isinstance(err, ast.Constant) and err.value is True):
                    found.append(f"line {node.lineno}: click.{func.attr}()")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "sys" and node.attr == "stdout"):
            found.append(f"line {node.lineno}: sys.stdout")
    return found


def test_only_the_cli_writes_stdout() -> None:
    offenders = {name: hits for name, tree in _modules().items()
                 if name not in PRINTERS and (hits := _writes_stdout(tree))}
    assert offenders == {}, f"only {', '.join(PRINTERS)} may write stdout; return the text instead"


def test_the_guard_finds_stdout_writes() -> None:
    """The scan above can fail: it sees the CLI's own writes, and each kind of stdout write."""
    assert _writes_stdout(ast.parse(THE_CLI.read_text()))
    sample = "import sys, click\nprint('x')\nprint('y', file=sys.stdout)\nclick.echo('z')\nsys.stdout.write('w')\n"
    assert {hit.split(":")[0] for hit in _writes_stdout(ast.parse(sample))} == {"line 2", "line 3", "line 4", "line 5"}
    fine = "import sys, click\nprint('x', file=sys.stderr)\nclick.echo('z', err=True)\n"
    assert _writes_stdout(ast.parse(fine)) == []


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


# The layers, lowest first; a module may import its own layer and those below it (CONTRIBUTING.md, "Layout").
# A module's layer is the longest name here that it is or lies under.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Pure: flags -> Config -> plan -> text, and text -> model -> decided changes. No kernel, no printing.
    ("core", ("istio_init", "istio_init.errors", "istio_init.timing", "istio_init.records", "istio_init.model",
              "istio_init.records_new", "istio_init.config",
              "istio_init.ifnames", "istio_init.resolvconf", "istio_init.iptables_save", "istio_init.nft",
              "istio_init.podcapture", "istio_init.rulesets",
              "istio_init.backends.iptables.reconcile", "istio_init.backends.iptables.committed")),
    # What speaks to the kernel: host/ (netlink, addresses, routes, nf_tables' tables, the namespace, lock
    # files), libnftables, the tools and python-iptables.
    ("kernel", ("istio_init.host", "istio_init.libnftables",
                "istio_init.backends.iptables.spawn", "istio_init.backends.iptables.tools",
                "istio_init.backends.iptables.restore", "istio_init.backends.iptables.libiptc")),
    # The one seam over all of it, which tests replace (tests/fakehost.py).
    ("system", ("istio_init.system",)),
    # Deciding and undoing changes, and choosing a backend.
    ("backends", ("istio_init.backends", "istio_init.backends.base", "istio_init.backends.iptables",
                  "istio_init.backends.iptables.backend", "istio_init.backends.nftables")),
    # All-or-nothing apply and clean, the one reader of installed rules, validation, the CNI plugin's
    # installation.
    ("operations", ("istio_init.apply", "istio_init.installed", "istio_init.validation",
                    "istio_init.cni_install", "istio_init.kubeapi")),
    # One command each: a run, trace, check, graph, the CNI plugin's logic and its node agent.
    ("commands", ("istio_init.runner", "istio_init.trace", "istio_init.check", "istio_init.graph",
                  "istio_init.cni", "istio_init.cni_agent")),
    # The front doors and the output layer they share.
    ("front doors", ("istio_init.frontdoor", "istio_init.logs", "istio_init.cli", "istio_init.entry",
                     "istio_init.__main__")),
)


def _layer(module: str) -> int | None:
    found = [(len(name), rank) for rank, (_, names) in enumerate(LAYERS) for name in names
             if module == name or (name != "istio_init" and module.startswith(name + "."))]
    return max(found)[1] if found else None


def _upward(modules: dict[str, ast.Module]) -> list[str]:
    found = []
    for name, tree in modules.items():
        rank = _layer(name)
        for imported in sorted(_imports(name, tree)):
            other = _layer(imported) if imported in modules else None
            if rank is not None and other is not None and other > rank:
                found.append(f"{name} ({LAYERS[rank][0]}) imports {imported} ({LAYERS[other][0]})")
    return found


def test_every_module_has_a_layer() -> None:
    assert [name for name in _modules() if _layer(name) is None] == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    assert _upward(_modules()) == []


def test_the_layer_check_finds_an_upward_import() -> None:
    """The check above can fail: a backend calling back into the runner, even inside a function."""
    modules = {"istio_init.backends.iptables.backend": ast.parse("def f():\n    from istio_init import runner\n"),
               "istio_init.runner": ast.parse("from istio_init.backends.iptables import backend\n")}
    assert _upward(modules) == ["istio_init.backends.iptables.backend (backends) imports istio_init.runner "
                                "(commands)"]


# The commands that show or judge what is installed (check, trace, graph, the CNI's CHECK, validation)
# read it through installed.py, never through their own calls to the System, the backends or the kernel:
# two readers would disagree (issue: trace walked legacy while check judged nft).
REPORTING = ("istio_init.trace", "istio_init.check", "istio_init.graph", "istio_init.cni",
             "istio_init.cni_agent", "istio_init.validation")
READS_INSTALLED = frozenset({"ours", "read_ruleset", "save_text", "candidates", "iptables_nft_tables",
                             "native_nft_tables", "legacy_tables", "owned_routing", "routing_present",
                             "loopback_ipv6_addresses", "has_loopback_address"})


def _reads_installed(tree: ast.Module) -> list[str]:
    """Calls that read installed rules, routing or addresses, and /proc/net paths, as 'line N: what'."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in READS_INSTALLED:
                found.append(f"line {node.lineno}: {name}()")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "/proc/net/" in node.value:
            found.append(f"line {node.lineno}: {node.value}")
    return found


def test_one_reader_of_installed_state() -> None:
    modules = _modules()
    assert _reads_installed(modules["istio_init.installed"])  # the one reader is seen reading
    offenders = {name: hits for name in REPORTING if (hits := _reads_installed(modules[name]))}
    assert offenders == {}, "read installed state through istio_init/installed.py"


def test_the_reader_check_finds_a_second_reader() -> None:
    """The check above can fail: a command asking a backend, the System or /proc itself."""
    sample = ("def f(b, s):\n    b.ours()\n    s.owned_routing(4, set(), set())\n"
              "    open('/proc/net/if_inet6')\n    backends.candidates('auto', [4])\n")
    assert sorted(hit.split(":")[0] for hit in _reads_installed(ast.parse(sample))) == ["line 2", "line 3",
                                                                                         "line 4", "line 5"]


def _top_level_imports(tree: ast.Module) -> set[str]:
    """Every module name a module imports anywhere (functions and TYPE_CHECKING blocks included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_pyroute2_is_the_tests_oracle_only() -> None:
    """istio_init speaks netlink through host/netlink.py; pyroute2 only checks it (tests/test_netlink.py)."""
    offenders = {name: sorted(m for m in _top_level_imports(tree) if m.split(".")[0] == "pyroute2")
                 for name, tree in _modules().items()}
    assert {name: hits for name, hits in offenders.items() if hits} == {}
    assert _top_level_imports(ast.parse("def f():\n    from pyroute2.netlink import nlmsg\n")) == {"pyroute2.netlink"}


def test_only_the_host_package_speaks_netlink() -> None:
    """One netlink stack, used by the host layer's modules; everything else asks the System."""
    speakers = {name for name, tree in _modules().items() if "istio_init.host.netlink" in _imports(name, tree)
                or "istio_init.host.netlink" in _top_level_imports(tree)}
    assert speakers and all(name.startswith("istio_init.host.") for name in speakers), sorted(speakers)
