"""`istio-init check --native-nftables` against real namespaces (root only).

check loads the flags' transaction into a scratch namespace and compares the
kernel's JSON of both sides, so right after an apply it must say in sync for
every case of both rule sets, and after each kind of drift name exactly it.
"""

from __future__ import annotations

import json

import pytest

from cases import CASES, Case
from nft_cases import NFT_CASES, NftCase
from nftsandbox import FOREIGN, TPROXY_FLAGS, args_18, case_files, istio_init, load, run_in
from nsutil import Namespace

pytestmark = pytest.mark.root


def _check(ns: Namespace, args: list[str], env: dict[str, str] | None = None,
           files: dict[str, str] | None = None) -> tuple[int, str, dict]:
    text = istio_init(ns, "check", *args, env=env, files=files, check=False)
    as_json = istio_init(ns, "check", *args, "--json", env=env, files=files, check=False)
    assert as_json.returncode == text.returncode, (text.stderr, as_json.stderr)
    return text.returncode, text.stdout, json.loads(as_json.stdout)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_in_sync_after_apply_18(netns: Namespace, case: Case) -> None:
    load(netns, FOREIGN)
    istio_init(netns, *args_18(case), env=case.env)
    code, out, data = _check(netns, args_18(case), case.env)
    assert code == 0 and "in sync" in out and data["in_sync"] is True, out


@pytest.mark.parametrize("case", NFT_CASES, ids=lambda c: c.name)
def test_in_sync_after_apply_current(netns: Namespace, case: NftCase) -> None:
    files = case_files(case)
    istio_init(netns, *case.argv, env=case.env, files=files)
    code, out, _ = _check(netns, case.argv, case.env, files)
    assert code == 0 and "in sync" in out, out


SEED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
        "-d", "15090,15021,15020", "--ipv6", "false", "--native-nftables"]


def _handles(ns: Namespace, table: str, chain: str) -> list[int]:
    out = run_in(ns, ["nft", "-j", "list", "chain", "inet", table, chain]).stdout
    return [obj["rule"]["handle"] for obj in json.loads(out)["nftables"] if "rule" in obj]


def test_each_drift_is_named(netns: Namespace) -> None:
    istio_init(netns, *SEED)

    # A foreign rule first in istio-inbound: one extra rule at position 1.
    run_in(netns, ["nft", "insert", "rule", "inet", "istio-proxy-nat", "istio-inbound", "counter", "return"])
    code, out, data = _check(netns, SEED)
    assert code == 1
    assert [(d["kind"], d["chain"], d["position"]) for d in data["differences"]] == [("extra", "istio-inbound", 1)]
    assert "extra      nft inet istio-proxy-nat istio-inbound rule 1:" in out

    # One rule deleted: exactly that one is missing, at its planned position.
    istio_init(netns, *SEED)
    handles = _handles(netns, "istio-proxy-nat", "istio-output")
    run_in(netns, ["nft", "delete", "rule", "inet", "istio-proxy-nat", "istio-output", "handle", str(handles[2])])
    code, _, data = _check(netns, SEED)
    assert code == 1
    assert [(d["kind"], d["chain"], d["position"]) for d in data["differences"]] == [("missing", "istio-output", 3)]

    # A flushed chain: every one of its rules missing, nothing else.
    istio_init(netns, *SEED)
    planned = len(_handles(netns, "istio-proxy-nat", "istio-output"))
    run_in(netns, ["nft", "flush", "chain", "inet", "istio-proxy-nat", "istio-output"])
    code, _, data = _check(netns, SEED)
    assert code == 1 and len(data["differences"]) == planned
    assert {(d["kind"], d["chain"]) for d in data["differences"]} == {("missing", "istio-output")}

    # Cleaned: every chain missing.
    istio_init(netns, "clean", "--native-nftables")
    code, _, data = _check(netns, SEED)
    assert code == 1 and {d["what"] for d in data["differences"]} == {"chain", "rule"}
    assert all(d["kind"] == "missing" for d in data["differences"])


def test_tproxy_route_removed_and_iptables_leftovers_are_named(netns: Namespace) -> None:
    istio_init(netns, *TPROXY_FLAGS)
    assert _check(netns, TPROXY_FLAGS)[0] == 0
    run_in(netns, ["ip", "rule", "del", "fwmark", "0x53a", "lookup", "134"])
    code, out, data = _check(netns, TPROXY_FLAGS)
    assert code == 1 and [(d["kind"], d["what"]) for d in data["differences"]] == [("missing", "routing")], out

    # Rules of istio-init left in iptables while native nftables serves the pod: extra (both would capture).
    istio_init(netns, *TPROXY_FLAGS)
    run_in(netns, ["iptables-legacy-restore", "--noflush"],
           stdin="*nat\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\nCOMMIT\n")
    code, _, data = _check(netns, TPROXY_FLAGS)
    assert code == 1 and {(d["kind"], d.get("flavour")) for d in data["differences"]} == {("extra", "legacy")}
