"""The native nftables dialect: the transaction the writer makes reads back, through the kernel, as the plan.

The JSON form of our tables only comes from the kernel (libnftables parses the
transaction's text and the kernel lists what it holds), so the round trip
runs there: each generated plan (tests/rulegen.py: every rule shape a rule set
plans, IPv4, IPv6 or both) is loaded with `nft -f` into a fresh network
namespace and listed back with `nft -j list ruleset`. Then, for each family:

- the reader (`nft.read.ruleset_from_json`) gives back the plan's rules, up to
  what the nft form says on purpose (see `_as_nft_holds_it`);
- those rules, written again, are the same transaction, byte for byte.

The same holds for every golden case of every rule set, where inserts make one
more allowance (`_same_decisions`).
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_init.model import APPEND, FamilyPlan, Match, Option, Rule, RulePlan, Step, is_builtin
from istio_init.nft.read import ruleset_from_json
from istio_init.nft.write import TABLE_PREFIX, transaction
from nsutil import Namespace
from rulegen import CHAINS, USER_CHAINS, bounded, rules

Ruleset = dict[str, dict[str, list[Rule]]]


def _listed(ns: Namespace, text: str) -> list[dict]:
    """`text` loaded with nft -f, then our tables as `nft -j list ruleset` objects."""
    loaded = ns.run("nft", "-f", "-", input=text, check=False)
    assert loaded.returncode == 0, f"nft refused:\n{text}\n{loaded.stderr}"
    objects = json.loads(ns.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    return [obj for obj in objects if "metainfo" not in obj
            and str(next(iter(obj.values())).get("table", next(iter(obj.values())).get("name"))).startswith(TABLE_PREFIX)]


def _as_nft_holds_it(rule: Rule) -> Rule:
    """A planned rule as the nft form states it (nft/write.py says why for each):

    a conntrack state is tested first; an INVALID drop without a protocol is
    TCP's only (Istio's nft rule set); a multiport list is a set, which the
    kernel keeps (and lists) in order.
    """
    def in_order(match: Match) -> Match:
        if match.module != "multiport":
            return match
        return match._replace(options=tuple(
            opt._replace(value=",".join(sorted(opt.value.split(","), key=int))) for opt in match.options))

    matches = tuple(sorted(map(in_order, rule.matches), key=lambda m: m.module != "conntrack"))
    protocol = rule.protocol
    if protocol is None and rule.option("conntrack", "ctstate") == Option("ctstate", "INVALID"):
        protocol = "tcp"
    return rule._replace(matches=matches, protocol=protocol)


def _expected(family: FamilyPlan) -> Ruleset:
    found: Ruleset = {}
    for table in family.tables():
        for chain, chain_rules in family.final_rules(table).items():
            if chain_rules:
                found.setdefault(table, {})[chain] = [_as_nft_holds_it(rule) for rule in chain_rules]
    return found


def _without_noops(ruleset: Ruleset) -> Ruleset:
    """Chains with rules only, and no jump into a chain that holds none for this family (a no-op there).

    A rule only one family has is written without a family guard when it is
    such a jump (as Istio writes it), so the other family reads it back too.
    Dropping one such jump can empty its chain, so this runs to a fixed point.
    """
    found: Ruleset = {}
    for table, chains in ruleset.items():
        for chain, chain_rules in chains.items():
            kept = [rule for rule in chain_rules if not rule.target.startswith("ISTIO_") or chains.get(rule.target)]
            if kept:
                found.setdefault(table, {})[chain] = kept
    return found if found == ruleset else _without_noops(found)


def _plan_of(read: dict[int, Ruleset], like: RulePlan) -> RulePlan:
    """What was read, as a plan of appends in the kernel's order, for the families `like` has rules for."""
    def family_plan(family: int) -> FamilyPlan:
        return FamilyPlan(family, tuple(Step(APPEND, rule) for chains in read[family].values()
                                        for chain_rules in chains.values() for rule in chain_rules))

    return RulePlan(family_plan(4) if like.ipv4.steps else FamilyPlan(4, ()),
                    family_plan(6) if like.ipv6 is not None else None)


@st.composite
def _plans(draw: st.DrawFn) -> tuple[RulePlan, list[int]]:
    """A plan over our tables' chains: every shape in their own chains (nothing jumps there from a hook,
    so every shape loads anywhere), and rules that return or accept in the built-in ones."""
    families = draw(st.sampled_from([[4], [6], [4, 6]]))
    tables = draw(st.lists(st.sampled_from(sorted(USER_CHAINS)), min_size=1, max_size=3, unique=True))
    plans = []
    for family in families:
        steps = []
        for table in tables:
            for rule in draw(st.lists(st.sampled_from(USER_CHAINS[table]).flatmap(
                    lambda chain, table=table, family=family: rules(family, table, chain, nft=True)), max_size=8)):
                steps.append(Step(APPEND, rule))
            builtins = [chain for chain in CHAINS[table] if is_builtin(table, chain)]
            for rule in draw(st.lists(st.sampled_from(builtins).flatmap(
                    lambda chain, table=table, family=family: rules(family, table, chain, nft=True,
                                                                    returns_only=True)), max_size=3)):
                steps.append(Step(APPEND, rule))
        plans.append(FamilyPlan(family, tuple(steps)))
    if families == [6]:  # a plan always has IPv4: here one with no rules
        plans.insert(0, FamilyPlan(4, ()))
    return RulePlan(plans[0], plans[1] if len(plans) > 1 else None), families


@pytest.mark.root
@bounded(150)
@given(planned=_plans(), guard=st.booleans())
def test_the_kernel_lists_the_transaction_back_as_the_plan(module_netns: Namespace,
                                                           planned: tuple[RulePlan, list[int]], guard: bool) -> None:
    plan, families = planned
    text = transaction(plan, guard_single_family=guard)[0]
    objects = _listed(module_netns, text)
    read = {family: ruleset_from_json(objects, family) for family in (4, 6)}
    for family_plan in plan.families():
        if not family_plan.steps:
            continue
        assert _without_noops(read[family_plan.family]) == _without_noops(_expected(family_plan))
    if plan.ipv6 is None and guard:  # an IPv4-only plan leaves IPv6 alone: nothing in a hook acts on it
        assert not any(rules for table in read[6].values() for chain, rules in table.items()
                       if is_builtin("nat", chain) or is_builtin("mangle", chain) or is_builtin("raw", chain))
    assert transaction(_plan_of(read, plan), guard_single_family=guard)[0] == text


# ---- every rule set's cases --------------------------------------------------------------------------------------

def _all_cases() -> list:
    from cases import CASES
    from cases_current import CURRENT_CASES
    from cases_generations import GENERATION_CASES

    return [*CASES, *CURRENT_CASES, *GENERATION_CASES]


def _same_decisions(read: list[Rule], planned: list[Rule]) -> bool:
    """The same rules, in an order that decides the same: only rules ending in the same verdict trade places.

    Istio's nft rule set inserts at an index of the inet chain, which holds both
    families' rules: an insert can land behind the other family's twin of an
    earlier insert, so within a family two inserted RETURNs may swap (which
    returns first does not matter).
    """
    if Counter(read) != Counter(planned):
        return False
    where = {id(rule): planned.index(rule) for rule in read}
    return all(a.target == b.target in ("RETURN", "ACCEPT", "DROP") and not a.target_options
               for i, a in enumerate(read) for b in read[i + 1:] if where[id(a)] > where[id(b)])


@pytest.mark.root
@pytest.mark.parametrize("case", _all_cases(), ids=lambda case: getattr(case, "id", case.name))
def test_every_cases_transaction_reads_back_as_its_plan(module_netns: Namespace, case) -> None:
    """What each rule set plans for each golden case, loaded as nft tables, reads back as the plan per family."""
    from clirun import given as flags
    from istio_init.backends.nftables import guard_single_family
    from istio_init.config import from_sources
    from istio_init.rulesets import plan as plan_of

    argv = case.argv() if callable(case.argv) else case.argv
    config = from_sources(flags(argv), case.env)
    plan = plan_of(config, case.ipv6, getattr(case, "resolvers", ()))
    guard = guard_single_family(config.rules_version)
    text = transaction(plan, guard_single_family=guard)[0]
    objects = _listed(module_netns, text)
    read = {family: ruleset_from_json(objects, family) for family in (4, 6)}
    for family_plan in plan.families():
        found, wanted = _without_noops(read[family_plan.family]), _without_noops(_expected(family_plan))
        assert {t: set(chains) for t, chains in found.items()} == {t: set(chains) for t, chains in wanted.items()}
        for table, chains in wanted.items():
            for chain, rules_planned in chains.items():
                assert _same_decisions(found[table][chain], rules_planned), (family_plan.family, table, chain)
    assert transaction(_plan_of(read, plan), guard_single_family=guard)[0] == text


def test_the_order_check_refuses_a_swap_that_decides_differently() -> None:
    """The check above can fail: a RETURN moved behind a REDIRECT decides differently; two RETURNs do not."""
    give_back = Rule("nat", "ISTIO_OUTPUT", "RETURN", destination="10.0.0.0/8")
    redirect = Rule("nat", "ISTIO_OUTPUT", "REDIRECT", protocol="tcp", target_options=(Option("to-ports", "15001"),))
    other = Rule("nat", "ISTIO_OUTPUT", "RETURN", out_interface="lo")
    assert not _same_decisions([redirect, give_back], [give_back, redirect])
    assert _same_decisions([other, give_back], [give_back, other])
    assert not _same_decisions([give_back], [give_back, other])


# ---- what nft cannot hold ------------------------------------------------------------------------------------------

def _interface_plan(name: str) -> RulePlan:
    rule = Rule("nat", "PREROUTING", "ISTIO_REDIRECT", in_interface=name)
    redirect = Rule("nat", "ISTIO_REDIRECT", "REDIRECT", protocol="tcp", target_options=(Option("to-ports", "15001"),))
    return RulePlan(FamilyPlan(4, (Step(APPEND, rule), Step(APPEND, redirect))))


@pytest.mark.root
def test_a_name_ending_in_a_literal_star_holds_14_bytes_in_nft(module_netns: Namespace) -> None:
    """The kernel fact behind ifnames' refusal: nft counts the escape of a final '*' in the 15 bytes."""
    fits = _listed(module_netns, transaction(_interface_plan("abcdefghijklm*"), guard_single_family=True)[0])
    assert ruleset_from_json(fits, 4)["nat"]["PREROUTING"][0].in_interface == "abcdefghijklm*"
    refused = module_netns.run("nft", "-f", "-", input=transaction(_interface_plan("abcdefghijklmn*"))[0],
                               check=False)
    assert refused.returncode != 0 and "exceeds maximum length" in refused.stderr


@pytest.mark.parametrize("name, native, refused", [("abcdefghijklmn*", True, True), ("abcdefghijklm*", True, False),
                                                   ("abcdefghijklmn*", False, False), ("abcdefghijklmn+", True, False),
                                                   ("abcdefg*hijklmn", True, False)])
def test_the_flags_refuse_what_nft_cannot_hold(name: str, native: bool, refused: bool) -> None:
    from clirun import given as flags
    from istio_init.config import from_sources
    from istio_init.errors import ConfigError

    argv = ["-p", "15001", "-u", "1337", "-i", "*", "-k", name, *(["--native-nftables"] if native else [])]
    try:
        config = from_sources(flags(argv), {})
    except ConfigError as exc:
        assert refused and exc.flag.startswith("-k") and "14 bytes" in exc.reason
    else:
        assert not refused and config.kube_virt_interfaces == (name,)
