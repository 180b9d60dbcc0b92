"""Every rule set through the tools around apply: check, trace, graph, clean, native nftables,
and re-runs that switch from one rule set to another (root only, each in a fresh namespace).

Each rule set gets one rich configuration: TPROXY inbound, outbound capture,
KubeVirt interface, DNS capture with a resolver, IPv6, and every later flag its
releases had (excluded interface, drop-invalid, trace logging), chosen from the
flag rows (`FlagSpec.exists_in`), so a new rule set is covered without an edit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clirun import clean_environ
from istio_golden import canonical, tables_in_order
from istio_init.iptables_save.read import parse_save
from istio_init.config import FLAGS_BY_DEST, RULE_SET_RELEASES
from istio_init.iptables_save.write import split_families
from nsutil import Namespace

pytestmark = pytest.mark.root

RULE_SETS = tuple(RULE_SET_RELEASES)
BACKENDS = {"libiptc": "legacy", "legacy": "legacy", "nft": "nft"}
SAVE = {"legacy": ("iptables-legacy-save", "ip6tables-legacy-save"), "nft": ("iptables-nft-save", "ip6tables-nft-save")}
LATER_FLAGS = {"exclude_interfaces": ["--istio-exclude-interfaces", "eth9"], "drop_invalid": ["--drop-invalid"],
               "trace_logging": ["--iptables-trace-logging"]}


def rich_args(rule_set: str) -> list[str]:
    args = ["--rules-version", rule_set, "-m", "TPROXY", "-b", "*", "-d", "15020", "-i", "*", "-k", "eth1",
            "-x", "10.96.0.0/12", "--redirect-dns", "-u", "1337", "-g", "1337", "--ipv6", "true"]
    for dest, flag in LATER_FLAGS.items():
        if FLAGS_BY_DEST[dest].exists_in(rule_set):
            args += flag
    return args


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\nnameserver 2001:db8::53\n")
    return {"ISTIO_INIT_RESOLV_CONF": str(resolv), "ISTIO_INIT_LOCKFILE": str(tmp_path / "istio-init.lock"),
            "XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}


def istio_init(ns: Namespace, env: dict[str, str], *args: str, code: int = 0) -> str:
    done = ns.run(sys.executable, "-m", "istio_init", *args, env=clean_environ(env), check=False)
    assert done.returncode == code, f"istio-init {' '.join(args)}: exit {done.returncode}: {done.stdout}{done.stderr}"
    return done.stdout


def assert_holds_exactly(ns: Namespace, flavour: str, dry_run: str) -> None:
    """The namespace's tables of `flavour` are the dry run's text, nothing more or less."""
    for want, save in zip(split_families(dry_run), SAVE[flavour]):
        saved = ns.save(save)
        used = {name for name, table in parse_save(saved).items() if table.rules or table.user_chains()}
        assert used == set(tables_in_order(want))
        if want:
            assert canonical(saved, tables_in_order(want)) == canonical(want, tables_in_order(want))


def assert_nothing_of_ours(ns: Namespace) -> None:
    for save in (*SAVE["legacy"], *SAVE["nft"]):
        assert "ISTIO" not in ns.run(save, check=False).stdout, save
    assert "lookup 133" not in ns.run("ip", "rule", "show").stdout


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_apply_check_clean(rule_set: str, backend: str, netns: Namespace, env: dict[str, str]) -> None:
    args = rich_args(rule_set)
    dry = istio_init(netns, env, *args, "-n")
    istio_init(netns, env, *args, "--iptables-backend", backend)
    assert_holds_exactly(netns, BACKENDS[backend], dry)
    assert "lookup 133" in netns.run("ip", "rule", "show").stdout
    istio_init(netns, env, "check", *args, "--iptables-backend", backend)
    istio_init(netns, env, *args, "--iptables-backend", backend)  # a re-run changes nothing
    assert_holds_exactly(netns, BACKENDS[backend], dry)
    netns.run(f"iptables-{BACKENDS[backend]}", "-t", "nat", "-F", "ISTIO_OUTPUT")
    istio_init(netns, env, "check", *args, "--iptables-backend", backend, code=1)
    istio_init(netns, env, "clean", "--iptables-backend", backend)
    assert_nothing_of_ours(netns)


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_native_nftables_apply_check_clean(rule_set: str, netns: Namespace, env: dict[str, str]) -> None:
    args = [*rich_args(rule_set), "--native-nftables"]
    istio_init(netns, env, *args)
    listing = netns.run("nft", "list", "ruleset").stdout
    assert "table inet istio-proxy-nat" in listing and "table inet istio-proxy-mangle" in listing
    istio_init(netns, env, "check", *args)
    istio_init(netns, env, *args)
    assert netns.run("nft", "list", "ruleset").stdout == listing  # a re-run changes nothing
    istio_init(netns, env, "clean", "--native-nftables")
    assert_nothing_of_ours(netns)
    assert "istio-proxy" not in netns.run("nft", "list", "ruleset").stdout


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_trace_and_graph_plan_and_live(rule_set: str, netns: Namespace, env: dict[str, str]) -> None:
    args = rich_args(rule_set)
    outbound = ["--direction", "out", "--dst", "198.51.100.7", "--dport", "80"]
    inbound = ["--direction", "in", "--dst", "203.0.113.9", "--dport", "8080"]
    assert "captured: REDIRECT to 15001" in istio_init(netns, env, "trace", *args, *outbound)
    assert "captured: TPROXY to 15006" in istio_init(netns, env, "trace", *args, *inbound)
    graph = istio_init(netns, env, "graph", *args)
    assert "ISTIO_OUTPUT" in graph and "ISTIO_TPROXY" in graph
    istio_init(netns, env, *args, "--iptables-backend", "legacy")
    assert "captured: REDIRECT to 15001" in istio_init(netns, env, "trace", *args, *outbound, "--live")
    assert "captured: TPROXY to 15006" in istio_init(netns, env, "trace", *args, *inbound, "--live")
    assert "ISTIO_OUTPUT" in istio_init(netns, env, "graph", *args, "--live")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_switching_between_rule_sets_converges(backend: str, netns: Namespace, env: dict[str, str]) -> None:
    """Each rule set applied over the one before (forward, then back): exactly its own rules each time."""
    order = [*RULE_SETS, *reversed(RULE_SETS[:-1])]
    for rule_set in order:
        args = rich_args(rule_set)
        istio_init(netns, env, *args, "--iptables-backend", backend)
        assert_holds_exactly(netns, BACKENDS[backend], istio_init(netns, env, *args, "-n"))
    istio_init(netns, env, "clean", "--iptables-backend", backend)
    assert_nothing_of_ours(netns)


@pytest.mark.parametrize("rule_set,reads_it", [("1.13", True), ("1.18", True), ("1.20", False), ("1.8", False)])
def test_agent_dual_stack_variable_of_istio_1_17_and_1_18(rule_set: str, reads_it: bool, netns: Namespace,
                                                          env: dict[str, str]) -> None:
    """ISTIO_AGENT_DUAL_STACK: IPv6 rules when the pod has any IPv6 address, for the releases that read it."""
    netns.add_address("192.0.2.10/24")  # the first address is IPv4: without dual stack, IPv4 rules only
    netns.add_address("2001:db8::10/64")
    args = ["--rules-version", rule_set, "-i", "*", "-n"]
    assert "# IPv6" not in istio_init(netns, env, *args)
    done = netns.run(sys.executable, "-m", "istio_init", *args, check=False,
                     env=clean_environ({**env, "ISTIO_AGENT_DUAL_STACK": "true"}))
    assert done.returncode == 0, done.stderr
    assert ("# IPv6" in done.stdout) == reads_it
    warned = [line for line in done.stderr.splitlines() if "ISTIO_AGENT_DUAL_STACK" in line]
    assert warned == ([] if reads_it else [f"istio-init: warning: ISTIO_AGENT_DUAL_STACK is read only with "
                                           f"--rules-version 1.13 to 1.18; ignored (this run uses {rule_set})"])
