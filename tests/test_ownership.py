"""Only what a rule set plans is istio-init's: user rules that look like ours survive everything (root).

Issue 9: a user chain named like ours (`ISTIO_FOO`), its rules and the jumps to
it, and user rules in built-in chains that no rule set can plan, added before
and after istio-init's rules, stay in place and in their order through an
apply, a re-run converging to other flags, and `clean`, with every backend.
The expected state is computed without istio-init's own notion of ownership:
the live rules minus exactly the dry run's lines must be the user's lines.
"""

from __future__ import annotations

import pytest

from istio_init.iptables_save.read import normalize
from nsutil import Namespace
from appliedns import BACKENDS, SAVE_TOOL, expected, istio_init, restore, save

pytestmark = pytest.mark.root

USER_BEFORE = """*nat
:ISTIO_FOO - [0:0]
-A PREROUTING -i eth0p -j ISTIO_FOO
-A PREROUTING -i cni0 -p tcp -j RETURN
-A PREROUTING -p udp -m udp --dport 53 -j RETURN
-A OUTPUT -o lo -p udp -j RETURN
-A ISTIO_FOO -p tcp -m tcp --dport 8443 -j RETURN
-A ISTIO_FOO -j RETURN
COMMIT
"""
# Added once istio-init's rules are in: appended after them and inserted before them.
USER_AFTER = """*nat
-A PREROUTING -i cni1 -p tcp -j RETURN
-I OUTPUT 1 -o lo -p udp -j RETURN
-A ISTIO_FOO -p udp -j RETURN
COMMIT
"""
USER_LINES_BEFORE = {"nat": [":ISTIO_FOO -", "-A PREROUTING -i eth0p -j ISTIO_FOO",
                             "-A PREROUTING -i cni0 -p tcp -j RETURN",
                             "-A PREROUTING -p udp -m udp --dport 53 -j RETURN", "-A OUTPUT -o lo -p udp -j RETURN",
                             "-A ISTIO_FOO -p tcp -m tcp --dport 8443 -j RETURN", "-A ISTIO_FOO -j RETURN"]}
FIRST = ["-i", "*", "-b", "*", "-k", "eth1", "--redirect-dns", "-u", "1337"]
SECOND = ["-i", "10.0.0.0/8", "-b", "8080", "-m", "TPROXY", "-k", "eth2,eth3"]


def _user_lines(state: dict[str, list[str]], planned: dict[str, list[str]]) -> dict[str, list[str]]:
    """The live lines left after taking out each planned line once; fails if a planned line is missing."""
    left: dict[str, list[str]] = {}
    for table, lines in state.items():
        remaining = list(lines)
        for line in planned.get(table, []):
            assert line in remaining, f"{table}: planned line missing: {line}"
            remaining.remove(line)
        if remaining:
            left[table] = remaining
    for table in planned:
        assert table in state, f"planned table {table} missing"
    return left


@pytest.mark.parametrize("backend", BACKENDS)
def test_user_chain_named_like_ours_and_lookalike_rules_survive(netns: Namespace, backend: str) -> None:
    flavour = SAVE_TOOL[backend]
    restore(netns, flavour, 4, USER_BEFORE)
    user_only = normalize(save(netns, flavour, 4))
    assert user_only == USER_LINES_BEFORE

    istio_init(netns, *FIRST, "--ipv6", "false", "--iptables-backend", backend)
    planned = expected(FIRST, ipv6=False)[0]
    assert _user_lines(normalize(save(netns, flavour, 4)), planned) == user_only

    restore(netns, flavour, 4, USER_AFTER)
    with_after = _user_lines(normalize(save(netns, flavour, 4)), planned)
    assert with_after["nat"][-1] == "-A ISTIO_FOO -p udp -j RETURN"
    assert "-A PREROUTING -i cni1 -p tcp -j RETURN" in with_after["nat"]

    # A re-run with other flags (other -k interfaces, TPROXY) converges and keeps every user line in order.
    istio_init(netns, *SECOND, "--ipv6", "false", "--iptables-backend", backend)
    planned = expected(SECOND, ipv6=False)[0]
    assert _user_lines(normalize(save(netns, flavour, 4)), planned) == with_after

    istio_init(netns, "clean", "--iptables-backend", backend)
    assert normalize(save(netns, flavour, 4)) == with_after


def test_the_owned_chains_spelled_once_more_are_every_rule_sets_union() -> None:
    """rulesets.OWNED_BY_ANY_RULE_SET (read without importing every rule set) is the union of their OWNED_CHAINS."""
    from istio_init.rulesets import OWNED_BY_ANY_RULE_SET, RULE_SETS, owned_by_every_rule_set, owned_chains

    tables = {table for module in RULE_SETS.values() for table in module.OWNED_CHAINS} | {"filter", "security"}
    assert {t: owned_chains(t) for t in tables} == {t: owned_by_every_rule_set(t) for t in tables}
    assert set(OWNED_BY_ANY_RULE_SET) <= tables and all(OWNED_BY_ANY_RULE_SET.values())
