"""--native-nftables in real network namespaces (root only).

Compared in nft's canonical form (`nft -s list ruleset` after loading): the
dry-run text loaded into an empty namespace must give the same ruleset as a
real apply, and for the current rule set the same as Istio's golden
transaction loaded the same way. Around that: re-runs, converging to other
flags, clean, someone else's `inet filter` table, and failures at the last
rule and after the commit, which must leave tables and routes as they were.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Iterator

import pytest

from cases import CASES, Case
from nft_cases import NFT_CASES, NftCase
from nftsandbox import FOREIGN, TPROXY_FLAGS, args_18, case_files, istio_init, listing, load, run_in
from nsutil import Namespace
from appliedns import routing

pytestmark = pytest.mark.root

NO_ISTIO_TOOLS = ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save")


@pytest.fixture
def other_netns() -> Iterator[Namespace]:
    ns = Namespace.create("iin")
    try:
        yield ns
    finally:
        ns.remove()


def dry_run_listing(ns: Namespace, args: list[str], env: dict[str, str], files: dict[str, str] | None = None,
                    foreign: bool = True) -> str:
    """What the dry-run text becomes when loaded into `ns` (which must be empty)."""
    if foreign:
        load(ns, FOREIGN)
    text = istio_init(ns, *args, "-n", env=env, files=files).stdout
    load(ns, text, files=files)
    result = listing(ns, files=files)
    run_in(ns, ["nft", "flush", "ruleset"])
    return result


def assert_no_iptables_rules(ns: Namespace) -> None:
    for tool in NO_ISTIO_TOOLS:
        assert "ISTIO" not in run_in(ns, [tool], check=False).stdout, tool


def _next(case: Case) -> Case:
    return CASES[(CASES.index(case) + 1) % len(CASES)]


# ---- the 1.8 rule set -----------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_18_apply_rerun_converge_clean(netns: Namespace, other_netns: Namespace, case: Case) -> None:
    fresh_routing = routing(netns)
    want = dry_run_listing(other_netns, args_18(case), case.env)
    assert "table inet istio-proxy-nat" in want and want.startswith("table inet filter")

    load(netns, FOREIGN)
    first = istio_init(netns, *args_18(case), env=case.env)
    assert listing(netns) == want
    assert first.stdout == istio_init(other_netns, *args_18(case), "-n", env=case.env).stdout  # printed as Istio
    assert_no_iptables_rules(netns)

    istio_init(netns, *args_18(case), env=case.env)  # a re-run with the same flags changes nothing
    assert listing(netns) == want

    other = _next(case)
    want_other = dry_run_listing(other_netns, args_18(other), other.env)
    istio_init(netns, *args_18(other), env=other.env)
    assert listing(netns) == want_other  # exactly the second case, and the foreign table

    istio_init(netns, "clean", "--native-nftables")
    assert listing(netns) == FOREIGN
    assert routing(netns) == fresh_routing  # TPROXY rule and route, ::6 on lo: gone
    again = istio_init(netns, "clean", "--native-nftables")
    assert "nothing to remove" in again.stderr
    assert_no_iptables_rules(netns)


OTHER_FLAGS = ["-b", "8080", "-i", "10.0.0.0/8,2001:db8::/32", "--ipv6", "false", "--native-nftables"]


def test_tproxy_to_redirect_removes_mangle_and_the_route(netns: Namespace) -> None:
    load(netns, FOREIGN)
    istio_init(netns, *TPROXY_FLAGS)
    assert "fwmark 0x53a lookup 134" in run_in(netns, ["ip", "rule"]).stdout
    assert "istio-proxy-mangle" in listing(netns)
    istio_init(netns, *OTHER_FLAGS)
    assert "istio-proxy-mangle" not in listing(netns)
    assert "fwmark" not in run_in(netns, ["ip", "rule"]).stdout
    dry = istio_init(netns, "clean", "-n", "--native-nftables")
    assert dry.stdout.splitlines()[0] == "delete table inet istio-proxy-nat"
    assert "istio-proxy-nat" in listing(netns)  # -n changed nothing


def _state(ns: Namespace) -> tuple[str, dict]:
    """The ruleset with handles and counters (a re-created table would differ), and the routing."""
    return run_in(ns, ["nft", "-a", "list", "ruleset"]).stdout, routing(ns)


def test_transaction_refused_at_its_last_rule_leaves_everything_as_it_was(netns: Namespace) -> None:
    load(netns, FOREIGN)
    istio_init(netns, *TPROXY_FLAGS)  # the previous run: TPROXY route and ::6 in place
    before = _state(netns)
    # Other flags, whose run would remove the TPROXY route and add rules of its own.
    done = istio_init(netns, *OTHER_FLAGS, fault="reject:nft", check=False)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert "nft transaction refused at line" in message
    assert ("table inet istio-proxy-nat, chain istio-output, rule 'counter jump istio-no-such-chain-fault'"
            in message), message
    assert "nothing had been changed" in message  # the kernel refused the whole transaction
    assert _state(netns) == before


@pytest.mark.parametrize("fault", ["after-commit:nft", "route"])
def test_failure_after_routes_or_commit_restores_the_previous_ruleset(netns: Namespace, fault: str) -> None:
    load(netns, FOREIGN)
    istio_init(netns, *OTHER_FLAGS)
    run_in(netns, ["nft", "add", "rule", "inet", "istio-proxy-nat", "output", "counter", "return"])  # drift
    before_listing, before_routing = listing(netns), routing(netns)
    done = istio_init(netns, *TPROXY_FLAGS, fault=fault, check=False)
    assert done.returncode == 1 and "put back" in done.stderr, done.stderr
    assert listing(netns) == before_listing
    assert routing(netns) == before_routing


def test_skip_rule_apply_changes_nothing(netns: Namespace) -> None:
    load(netns, FOREIGN)
    istio_init(netns, *OTHER_FLAGS, "--skip-rule-apply")
    assert listing(netns) == FOREIGN


# ---- Istio's goldens (current rule set) -----------------------------------------------

def _current_available() -> bool:
    from istio_init.rulesets import RULE_SETS

    return "current" in RULE_SETS


def golden_listing(ns: Namespace, case: NftCase) -> str:
    load(ns, FOREIGN)
    load(ns, case.golden.read_text(), files=case_files(case))
    result = listing(ns, files=case_files(case))
    run_in(ns, ["nft", "flush", "ruleset"])
    return result


@pytest.mark.skipif(not _current_available(), reason="the current rule set (--rules-version current) is "
                    "not in this build")
@pytest.mark.parametrize("case", NFT_CASES, ids=lambda c: c.name)
def test_istio_golden(netns: Namespace, other_netns: Namespace, case: NftCase) -> None:
    files = case_files(case)
    fresh_routing = routing(netns)
    want = golden_listing(other_netns, case)
    assert dry_run_listing(other_netns, case.argv, case.env, files) == want

    load(netns, FOREIGN)
    istio_init(netns, *case.argv, env=case.env, files=files)
    assert listing(netns, files=files) == want
    assert_no_iptables_rules(netns)
    istio_init(netns, *case.argv, env=case.env, files=files)
    assert listing(netns, files=files) == want

    other = NFT_CASES[(NFT_CASES.index(case) + 1) % len(NFT_CASES)]
    istio_init(netns, *other.argv, env=other.env, files=case_files(other))
    assert listing(netns, files=case_files(other)) == golden_listing(other_netns, other)

    istio_init(netns, "clean", "--native-nftables")
    assert listing(netns) == FOREIGN
    assert routing(netns) == fresh_routing  # IPv4 and IPv6 TPROXY routes and ::6: gone


def test_backend_reads_json_and_dumps_only_our_tables(netns: Namespace) -> None:
    load(netns, FOREIGN)
    istio_init(netns, *TPROXY_FLAGS)
    script = ("import json; from istio_init.backends.nftables import NftablesBackend as B; b = B(); "
              "print(json.dumps(sorted({o['table']['name'] for o in b.ours() if 'table' in o}))); "
              "print(b.listing(), end='')")
    out = run_in(netns, [sys.executable, "-c", script]).stdout
    names, dumped = out.split("\n", 1)
    assert json.loads(names) == ["istio-proxy-mangle", "istio-proxy-nat"]
    assert dumped.startswith("table inet istio-proxy-nat {") and "table inet filter" not in dumped
    assert "istio-proxy-mangle" in dumped and "counter packets" in dumped


@pytest.mark.parametrize("rules", ["1.8", "current"])
def test_run_validation_with_native_nftables(rules: str) -> None:
    """--run-validation proves capture through the nft rules; without them it fails with 126."""
    from cases import SEED_ARGS
    from podnet import Pod

    extra = ("--native-nftables", "--rules-version", rules)
    pod = Pod.up((*SEED_ARGS, *extra), ipv6=True, listeners=False, apply=False, tag=f"nftvalid{rules.replace('.', '')}")
    try:
        base = [sys.executable, "-m", "istio_init", *SEED_ARGS, *extra, "--ipv6", "true", "--run-validation",
                "--network-namespace", f"/run/netns/{pod.name}"]
        unvalidated = subprocess.run([*base, "--skip-rule-apply", "--probe-timeout", "1s"], capture_output=True,
                                     text=True, timeout=60, check=False)
        assert unvalidated.returncode == 126, unvalidated.stderr
        done = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "validation passed: IPv4" in done.stderr and "IPv6" in done.stderr
    finally:
        pod.down()


def test_first_apply_refused_removes_the_routes_and_address_it_added(netns: Namespace) -> None:
    load(netns, FOREIGN)
    before = _state(netns)
    done = istio_init(netns, *TPROXY_FLAGS, fault="reject:nft", check=False)
    assert done.returncode == 1 and "chain istio-inbound" in done.stderr, done.stderr
    assert _state(netns) == before  # no fwmark rule, no table 134 route, no ::6, no tables


@pytest.mark.parametrize("flags", [[], TPROXY_FLAGS], ids=["redirect", "tproxy"])
def test_a_first_apply_reports_the_tables_a_read_back_finds(netns: Namespace, flags: list[str]) -> None:
    """With none of our tables there, converge does not read the ruleset back: what it reports as
    changed (and would put back) must be exactly the tables the kernel then holds; a removal of
    nothing changes nothing."""
    from cases import SEED_ARGS

    load(netns, FOREIGN)
    script = ("import json, sys; from istio_init.backends.nftables import NftablesBackend as B; "
              "from istio_init.config import from_sources; from istio_init.entry import parse_run; "
              "from istio_init.rulesets import plan; "
              "cfg = from_sources(parse_run(sys.argv[1:]), {}); b = B(True); "
              "gone = b.remove(); undo = b.converge(plan(cfg, True)); "
              "print(json.dumps([list(gone.changed), list(undo.changed), "
              "sorted({o['table']['name'] for o in b.ours() if 'table' in o})]))")
    out = run_in(netns, [sys.executable, "-c", script, *SEED_ARGS, *flags]).stdout
    removed, changed, present = json.loads(out)
    assert removed == []
    assert changed == present and "istio-proxy-nat" in present
    assert ("istio-proxy-mangle" in present) == bool(flags)
    assert "table inet filter" in listing(netns)  # the foreign table is untouched
