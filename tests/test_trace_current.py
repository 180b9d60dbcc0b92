"""`istio-init trace` on the current Istio rule set (1.25-1.32): raw table, DNS over UDP, marks, owner groups.

The rules are Istio's own: the IPv4 tables of three capture goldens of
istio/istio, `tools/istio-iptables/pkg/capture/testdata/{dns-uid-gid,tproxy,
outbound-owner-groups}.golden`, read from tests/golden/current/, where they
are in the canonical iptables-save form the kernel gives them back in. No
planner is involved: these pin the evaluator on the rule shapes of the
current rule set (raw-table CT zones for DNS, `-m multiport ! --dports`,
`--sport`, `-m mark`/`-m connmark` after MARK and CONNMARK, several owner
matches in one rule), whichever planner wrote them.
"""

from __future__ import annotations

from typing import Any

import pytest

from cases_current import GOLDEN_DIR
from istio_init.iptables_save.write import split_families
from istio_init.trace import make_connection, ruleset_from_save, trace


def _ipv4_tables(name: str) -> str:
    """The IPv4 tables of the capture golden `name`, as tests/golden/current/ holds them (iptables-save form)."""
    return split_families((GOLDEN_DIR / f"{name}.txt").read_text())[0]


DNS_UID_GID = _ipv4_tables("dns-uid-gid")
TPROXY = _ipv4_tables("tproxy")
OWNER_GROUPS = _ipv4_tables("outbound-owner-groups")


def _outcome(text: str, direction: str, dst: str, dport: int, **kw: Any) -> tuple[str, list[str]]:
    verdict = trace(ruleset_from_save(text), make_connection(direction, dst, dport, **kw))
    return verdict.outcome, [f"{h.table} {h.chain} {h.number} {h.target}" for h in verdict.hits]


def test_dns_over_udp_goes_through_raw_zones_to_the_agent() -> None:
    outcome, hits = _outcome(DNS_UID_GID, "out", "127.0.0.53", 53, protocol="udp", uid=1000, gid=1000)
    assert outcome == "captured: REDIRECT to 15053"
    assert hits == ["raw OUTPUT 1 ISTIO_OUTPUT_DNS", "raw ISTIO_OUTPUT_DNS 9 CT",
                    "nat OUTPUT 1 ISTIO_OUTPUT", "nat ISTIO_OUTPUT 14 ISTIO_OUTPUT_DNS",
                    "nat ISTIO_OUTPUT_DNS 2 REDIRECT"]


def test_the_proxys_own_dns_query_gets_zone_1_and_is_not_captured() -> None:
    outcome, hits = _outcome(DNS_UID_GID, "out", "127.0.0.53", 53, protocol="udp", uid=3, gid=1000)
    assert outcome == "not captured: RETURN at ISTIO_OUTPUT rule 4 (-m owner --uid-owner 3 -j RETURN)"
    assert hits[:3] == ["raw OUTPUT 1 ISTIO_OUTPUT_DNS", "raw ISTIO_OUTPUT_DNS 1 CT", "raw ISTIO_OUTPUT_DNS 9 CT"]


def test_dns_over_tcp_and_the_multiport_exception() -> None:
    assert _outcome(DNS_UID_GID, "out", "127.0.0.53", 53, uid=1000, gid=1000)[0] == "captured: REDIRECT to 15053"
    # The proxy (uid 3) calling a local address on port 53 is not sent back to inbound capture.
    outcome, hits = _outcome(DNS_UID_GID, "out", "192.0.2.10", 53, uid=3, gid=1000, out_interface="lo")
    assert "nat ISTIO_OUTPUT 2 ISTIO_IN_REDIRECT" not in hits and outcome.startswith("not captured: RETURN")
    outcome, _ = _outcome(DNS_UID_GID, "out", "192.0.2.10", 8080, uid=3, gid=1000, out_interface="lo")
    assert outcome == "captured: REDIRECT to 15006"


def test_tproxy_inbound_passes_the_mark_checks_and_is_captured() -> None:
    outcome, hits = _outcome(TPROXY, "in", "192.0.2.10", 8080)
    assert outcome == "captured: TPROXY to 15006"
    assert hits == ["raw PREROUTING 1 ISTIO_INBOUND", "mangle PREROUTING 2 ISTIO_INBOUND",
                    "mangle ISTIO_INBOUND 5 ISTIO_TPROXY", "mangle ISTIO_TPROXY 1 TPROXY"]


def test_tproxy_excluded_interface_returns_first() -> None:
    outcome, _ = _outcome(TPROXY, "in", "192.0.2.10", 8080, in_interface="not-istio-nic")
    assert outcome == "not captured: RETURN at PREROUTING rule 1 (-i not-istio-nic -j RETURN)"


def test_the_proxy_to_a_local_app_is_marked_then_redirected_inbound() -> None:
    outcome, hits = _outcome(TPROXY, "out", "192.0.2.10", 8080, uid=1337, gid=1337, out_interface="lo")
    assert "mangle OUTPUT 3 MARK" in hits and "mangle OUTPUT 5 CONNMARK" not in hits
    assert outcome == "captured: REDIRECT to 15006"


MARKS = """*mangle
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m tcp --dport 9000 -j MARK --set-xmark 0x539/0xffffffff
-A OUTPUT -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A OUTPUT -p tcp -m connmark --mark 0x539 -j MARK --set-xmark 0x1/0xffffffff
COMMIT
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m mark --mark 0x1 -j RETURN
-A OUTPUT -p tcp -j REDIRECT --to-ports 15001
COMMIT
"""


@pytest.mark.parametrize("dport,outcome", [
    (9000, "not captured: RETURN at OUTPUT rule 1 (-p tcp -m mark --mark 0x1 -j RETURN)"),
    (9001, "captured: REDIRECT to 15001"),
])
def test_marks_follow_mark_and_connmark_across_tables(dport: int, outcome: str) -> None:
    assert _outcome(MARKS, "out", "198.51.100.20", dport)[0] == outcome


@pytest.mark.parametrize("gid,last", [(1000, 8), (202, None), (20001, None)])
def test_an_owner_group_rule_needs_every_group_match(gid: int, last: int | None) -> None:
    outcome, hits = _outcome(OWNER_GROUPS, "out", "198.51.100.20", 80, uid=1000, gid=gid)
    if last is None:  # a listed group: past the rule, and nothing else here captures (no -i)
        assert hits == ["nat OUTPUT 1 ISTIO_OUTPUT"]
        assert outcome == "not captured: no rule matched in ISTIO_OUTPUT (entered from OUTPUT rule 1)"
    else:
        assert outcome == ("not captured: RETURN at ISTIO_OUTPUT rule 8 "
                           "(-m owner ! --gid-owner 20001 -m owner ! --gid-owner 202 -j RETURN)")


def test_a_udp_reply_from_a_named_source_port_is_not_guessed_to_match() -> None:
    """The first packet's source port is ephemeral: `--sport 53` does not match, `CT --zone 1` is not set."""
    _, hits = _outcome(DNS_UID_GID, "in", "192.0.2.10", 40000, protocol="udp", src="127.0.0.53")
    assert "raw ISTIO_INBOUND 1 CT" not in hits and hits[0] == "raw PREROUTING 1 ISTIO_INBOUND"
