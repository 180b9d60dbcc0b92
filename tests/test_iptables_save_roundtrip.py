"""The iptables-save dialect: its writer and its reader are each other's inverse (Hypothesis).

istio-init finds its own rules again by comparing the text it writes with the
text iptables-save prints, and reasons about live rules (ownership, trace,
check) through what the reader makes of that text. So for every rule shape a
rule set plans (tests/rulegen.py):

- pure: reading a written rule gives the rule back, and written text read and
  written again is the same text, for rules and for whole tables;
- through the kernel (root): the written tables, loaded with the legacy and
  the nft restore tool in a fresh namespace, print back through iptables-save
  exactly as written, and read back as the generated rules.
"""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_init.iptables_save.read import SavedRule, parse_rule, parse_save
from istio_init.iptables_save.write import rule_spec, saved_text, table_text
from istio_init.model import BUILTIN_CHAINS, Match, Option, Rule
from nsutil import Namespace
from rulegen import CHAINS, USER_CHAINS, bounded, rules

FAMILIES = st.sampled_from([4, 6])


@bounded(600)
@given(FAMILIES.flatmap(lambda family: rules(family, comments=True)))
def test_reading_a_written_rule_gives_the_rule(rule: Rule) -> None:
    spec = rule_spec(rule)
    assert parse_rule(rule.table, rule.chain, spec) == rule, spec
    assert rule_spec(parse_rule(rule.table, rule.chain, spec)) == spec


def _table_of(name: str, generated: list[Rule], policies: dict[str, str]) -> str:
    """`generated` as the table block iptables-save prints (built-in chains with their policy, user chains sorted).

    Every user chain of the table is declared, as a rule set does: a jump needs its chain.
    """
    by_chain: dict[str, list[str]] = {}
    for rule in generated:
        by_chain.setdefault(rule.chain, []).append(rule_spec(rule))
    builtins = [(chain, policies.get(chain, "ACCEPT"), "[0:0]") for chain in BUILTIN_CHAINS[name]]
    return table_text(name, builtins, sorted(USER_CHAINS[name]), by_chain)


@st.composite
def _tables(draw: st.DrawFn, user_chains_only: bool = False) -> tuple[int, dict[str, list[Rule]]]:
    family = draw(FAMILIES)
    tables = {}
    for name in draw(st.lists(st.sampled_from(sorted(CHAINS)), min_size=1, max_size=3, unique=True)):
        chains = USER_CHAINS[name] if user_chains_only else CHAINS[name]
        tables[name] = draw(st.lists(st.sampled_from(chains).flatmap(
            lambda chain, name=name: rules(family, name, chain, comments=True)), max_size=12))
    return family, tables


@bounded(200)
@given(_tables(), st.sampled_from(["ACCEPT", "DROP"]))
def test_written_tables_read_and_written_again_are_the_same_text(generated: tuple[int, dict[str, list[Rule]]],
                                                                   policy: str) -> None:
    _, tables = generated
    text = "".join(_table_of(name, found, {"FORWARD": policy}) for name, found in tables.items())
    parsed = parse_save(text)
    assert saved_text(parsed) == text
    for name, found in tables.items():
        assert [saved.rule for saved in parsed[name].rules] == _in_chain_order(name, found)


def _in_chain_order(name: str, generated: list[Rule]) -> list[Rule]:
    """The rules in the order iptables-save lists them: built-in chains first, then user chains sorted."""
    order = [*BUILTIN_CHAINS[name], *sorted(USER_CHAINS[name])]
    return sorted(generated, key=lambda rule: order.index(rule.chain))


def test_the_reader_refuses_what_the_model_cannot_hold() -> None:
    """The properties above can fail: text the writer never produces is refused, not guessed."""
    assert SavedRule("nat", "X", "! -s 10.0.0.0/8 -j RETURN").rule is None
    assert SavedRule("nat", "X", '-m comment --comment "open -j RETURN').problem == "a quote that is not closed"
    # A comment as iptables-save 1.8.9 printed it back after `-m comment --comment 'a "b" \\c'`.
    printed = '-m comment --comment "a \\"b\\" \\\\c" -j RETURN'
    rule = Rule("nat", "X", "RETURN", matches=(Match("comment", (Option("comment", 'a "b" \\c'),)),))
    assert parse_rule("nat", "X", printed) == rule and rule_spec(rule) == printed


# ---- through the kernel --------------------------------------------------------------------------------------------

SAVE = {("legacy", 4): "iptables-legacy", ("legacy", 6): "ip6tables-legacy", ("nft", 4): "iptables-nft",
        ("nft", 6): "ip6tables-nft"}


def _kernel_round_trip(ns: Namespace, flavour: str, family: int, tables: dict[str, list[Rule]]) -> None:
    tool = SAVE[(flavour, family)]
    text = "".join(_table_of(name, found, {}) for name, found in tables.items())
    flush = "".join(f"*{name}\n" + "".join(f":{c} ACCEPT [0:0]\n" for c in BUILTIN_CHAINS[name]) + "COMMIT\n"
                    for name in tables)
    try:
        ns.run(f"{tool}-restore", "-w", "30", input=text)  # the xtables lock is the machine's, not the namespace's
        saved = "".join(ns.run(f"{tool}-save", "-t", name).stdout for name in tables)
    except subprocess.CalledProcessError as exc:
        raise AssertionError(f"{tool}-restore or -save refused:\n{text}\n{exc.stderr}") from None
    finally:
        ns.run(f"{tool}-restore", "-w", "30", input=flush, check=False)  # the tables' content as a fresh namespace has it
    kernel = "".join(line + "\n" for line in saved.splitlines() if not line.startswith("#"))
    assert kernel == text  # the kernel prints exactly what the writer wrote
    parsed = parse_save(kernel)
    assert saved_text(parsed) == kernel
    for name, found in tables.items():
        assert [saved.rule for saved in parsed[name].rules] == _in_chain_order(name, found)


@pytest.mark.root
@pytest.mark.parametrize("flavour", ["legacy", "nft"])
@bounded(100)
@given(generated=_tables(user_chains_only=True))
def test_the_kernel_prints_written_tables_back_as_written(module_netns: Namespace, flavour: str,
                                                          generated: tuple[int, dict[str, list[Rule]]]) -> None:
    """Rules in user chains nothing jumps to: the kernel checks no hook there, so every shape loads anywhere.

    Each example restores the tables it used to what a fresh namespace holds.
    """
    family, tables = generated
    _kernel_round_trip(module_netns, flavour, family, tables)


# ---- what the rule sets plan ---------------------------------------------------------------------------------------

def _as_given(family: int, bits: int, prefix: int) -> str:
    """A CIDR as a user may write it in -i/-x: host bits set, Python's IPv6 spelling (no dotted quad)."""
    import ipaddress

    address = ipaddress.IPv4Address(bits % 2**32) if family == 4 else ipaddress.IPv6Address(bits)
    return f"{address}/{prefix}"


_GIVEN_CIDRS = st.one_of(
    st.builds(_as_given, st.just(4), st.integers(0, 2**32 - 1), st.integers(0, 32)),
    st.builds(_as_given, st.just(6), st.one_of(st.integers(0, 2**128 - 1),
                                               st.integers(0, 2**32 - 1).map(lambda low: 0xFFFF << 32 | low),
                                               st.integers(2, 2**32 - 1)), st.integers(0, 128)))


def _kernel_spelling(cidr: str) -> str | None:
    """How iptables-save prints a -d of `cidr`: inet_ntop's address (IPv4-mapped as a dotted quad), none for /0."""
    import ipaddress
    import socket

    network = ipaddress.ip_network(cidr, strict=False)
    if network.prefixlen == 0:
        return None
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(family, network.network_address.packed)}/{network.prefixlen}"


@bounded(150)
@given(st.sampled_from(["1.8", "1.20", "current"]), st.lists(_GIVEN_CIDRS, min_size=1, max_size=3),
       st.lists(_GIVEN_CIDRS, min_size=1, max_size=3))
def test_rule_sets_spell_addresses_as_the_kernel_prints_them(version: str, include: list[str],
                                                            exclude: list[str]) -> None:
    """-i and -x networks reach the rules in the kernel's spelling, so a re-run or `check` finds them unchanged.

    A /0 is stored by the kernel as no address at all (iptables-save prints no
    `-d`), and an IPv4-mapped IPv6 address is printed as a dotted quad.
    """
    from clirun import given as flags
    from istio_init.config import from_sources
    from istio_init.rulesets import plan

    args = ["-p", "15001", "-u", "1337", "-m", "REDIRECT", "-i", ",".join(include), "-x", ",".join(exclude),
            "--rules-version", version]
    planned = plan(from_sources(flags(args), {}), True)
    wanted = {4: set(), 6: set()}
    for cidr in include + exclude:
        spelled = _kernel_spelling(cidr)
        wanted[4 if ":" not in cidr else 6].add(spelled)
    for family in planned.families():
        found = {step.rule.destination for step in family.steps
                 if step.rule.chain == "ISTIO_OUTPUT" and step.rule.target in ("ISTIO_REDIRECT", "RETURN")}
        found -= {None} - wanted[family.family]  # the plain `-j RETURN` of ISTIO_OUTPUT has no address either
        assert found - {"127.0.0.1/32", "::1/128"} == wanted[family.family] - {"127.0.0.1/32", "::1/128"}
