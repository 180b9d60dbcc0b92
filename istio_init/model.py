"""The rule plan as plain data.

A `Rule` holds its parts in the order `iptables-save` prints them (addresses,
interfaces, protocol, matches, target), with values already in the kernel's
canonical spelling (`/32` suffixes, `--set-xmark 0x539/0xffffffff`), so that
rendering is a join and a round trip through the kernel reads back unchanged.
A `FamilyPlan` keeps the operations in the order Istio creates them; the
final order of each chain (inserts at their positions) is derived, not stored.

The types are typed NamedTuples rather than frozen dataclasses: just as
immutable and comparable, but far cheaper to define, and every pod start
defines them and the large configurations build thousands of rules
(docs/performance.md, "What start-up avoids").
"""

from __future__ import annotations

from itertools import groupby, repeat
from _operator import attrgetter  # operator.py only re-exports the C module's
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Iterable, Sequence

# The source address of the proxy's inbound passthrough connections (Istio's "SIX"); the
# IPv6 one is added to `lo` by the run (RulePlan.loopback_addresses).
IPV4_PASSTHROUGH_ADDRESS = "127.0.0.6/32"
IPV6_PASSTHROUGH_ADDRESS = "::6/128"

# --native-nftables: istio-init's tables are exactly these, in family inet (any other table,
# `inet istio-proxy-foo` included, is someone else's), in the order Istio creates them.
NATIVE_TABLE_PREFIX = "istio-proxy-"
NATIVE_TABLES = ("nat", "mangle", "raw")

APPEND = "A"
INSERT = "I"  # at Step.position (1-based), as `iptables -I CHAIN N`

BUILTIN_CHAINS = {
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}


class Option(NamedTuple):
    """One `--name value` of a match or target, optionally negated with `!`."""

    name: str
    value: str = ""
    negated: bool = False


class Match(NamedTuple):
    """`-m module --option value ...`."""

    module: str
    options: tuple[Option, ...]


class Rule(NamedTuple):
    table: str
    chain: str
    target: str
    source: str | None = None
    destination: str | None = None
    negate_destination: bool = False
    in_interface: str | None = None
    out_interface: str | None = None
    protocol: str | None = None
    matches: tuple[Match, ...] = ()
    target_options: tuple[Option, ...] = ()

    def option(self, module: str, name: str) -> Option | None:
        """The first `--name` option of match `module`, if the rule has one."""
        for match in self.matches:
            if match.module == module:
                for opt in match.options:
                    if opt.name == name:
                        return opt
        return None


class Step(NamedTuple):
    """One rule operation, in creation order."""

    op: str  # APPEND or INSERT
    rule: Rule
    position: int = 1  # where an INSERT goes, 1-based, as `-I CHAIN N`; unused by APPEND


def destination_appends(table: str, chain: str, target: str, destinations: Iterable[str | None]) -> list[Step]:
    """`Step(APPEND, Rule(table, chain, target, destination=d))` for each destination, in order.

    An -x list holds up to 8,000 CIDRs, one rule each, and the generated
    NamedTuple constructors are Python functions: building both tuples
    directly, in C loops, costs a third of that. The field order is the declarations' above;
    tests/test_model.py compares the result with the constructors'.
    """
    new = tuple.__new__
    destinations = list(destinations)
    # Both tuples built by map and zip over repeat(): the loop runs in C, no bytecode per rule.
    rules = map(new, repeat(Rule), zip(repeat(table), repeat(chain), repeat(target), repeat(None), destinations,
                                       repeat(False), repeat(None), repeat(None), repeat(None), repeat(()), repeat(())))
    steps = list(map(new, repeat(Step), zip(repeat(APPEND), rules, repeat(1))))
    # A /0 is planned as no address (the kernel keeps none): such a rule cannot join an address list.
    if len(steps) >= DESTINATION_RUN_MIN and None not in destinations:
        del _DESTINATION_RUNS[:-_RUNS_KEPT]
        addresses: list[str] = destinations  # type: ignore[assignment]  # None is not in it (checked above)
        _DESTINATION_RUNS.append(DestinationRun(tuple(steps), addresses))
    return steps


class DestinationRun(NamedTuple):
    """Steps destination_appends made: appends to one chain with one target, each rule only a destination."""

    steps: tuple[Step, ...]
    destinations: list[str]


# The runs destination_appends made lately (a CNI agent plans pod after pod: a few are kept). An -x
# list of 8,000 CIDRs is such a run; knowing where one lies lets the steps be spelled and written to
# the restore tool as one run, not rule by rule in Python (docs/performance.md, "What start-up avoids").
_DESTINATION_RUNS: list[DestinationRun] = []
_RUNS_KEPT = 8
DESTINATION_RUN_MIN = 32  # shorter runs cost nothing worth remembering


def destination_runs(steps: Sequence[Step]) -> dict[int, DestinationRun]:
    """Where runs made by destination_appends lie in `steps`: start index -> run (a sub-run is not found).

    Found by comparing steps, without Python code per step: `steps[i:i + n]`
    equal to a run's steps means those rules are exactly its destinations'.
    """
    found: dict[int, DestinationRun] = {}
    if len(steps) < DESTINATION_RUN_MIN:
        return found
    for run in _DESTINATION_RUNS:
        try:
            start = steps.index(run.steps[0])
        except ValueError:
            continue
        end = start + len(run.steps)
        if tuple(steps[start:end]) == run.steps and not any(start < s + len(r.steps) and s < end
                                                              for s, r in found.items()):
            found[start] = run
    return found


def step_segments(steps: Sequence[Step]) -> list[tuple[int, int, DestinationRun | None]]:
    """`steps` cut into (start, end, run): the runs destination_appends made, and what lies between (None)."""
    runs = destination_runs(steps)
    cuts: list[tuple[int, int, DestinationRun | None]] = []
    done = 0
    for start in sorted(runs):
        if start > done:
            cuts.append((done, start, None))
        done = start + len(runs[start].steps)
        cuts.append((start, done, runs[start]))
    if done < len(steps) or not steps:
        cuts.append((done, len(steps), None))
    return cuts


def _representatives(steps: Sequence[Step]) -> Sequence[Step]:
    """`steps` with each destination run down to its first step: what a question about tables,
    chains and targets needs to look at."""
    if len(steps) < DESTINATION_RUN_MIN:
        return steps
    kept: list[Step] = []
    for start, end, run in step_segments(steps):
        kept += steps[start:end] if run is None else steps[start:start + 1]
    return kept


def is_builtin(table: str, chain: str) -> bool:
    return chain in BUILTIN_CHAINS.get(table, ())


_RULE = attrgetter("rule")
_TABLE = attrgetter("rule.table")
_TABLE_OP_CHAIN = attrgetter("rule.table", "op", "rule.chain")
_TABLE_CHAIN_TARGET = attrgetter("rule.table", "rule.chain", "rule.target")


class FamilyPlan(NamedTuple):
    """The rules of one IP family, as the ordered operations that create them."""

    family: int  # 4 or 6
    steps: tuple[Step, ...]

    def tables(self) -> list[str]:
        """Tables in the order they are first used."""
        return list(dict.fromkeys(map(_TABLE, _representatives(self.steps))))  # map/attrgetter: no Python code per step

    def chains(self, table: str) -> list[str]:
        """New (non built-in) chains of `table`, in the order they are first used."""
        seen: dict[str, None] = {}
        # Thousands of rules share a few (table, chain, target) triples: look at each one once.
        for step_table, *pair in dict.fromkeys(map(_TABLE_CHAIN_TARGET, _representatives(self.steps))):
            if step_table != table:
                continue
            for chain in pair:
                if chain.startswith("ISTIO_") and not is_builtin(table, chain):
                    seen.setdefault(chain)
        return list(seen)

    def final_rules(self, table: str) -> dict[str, list[Rule]]:
        """Each chain's rules in the order the kernel ends up holding them."""
        chains: dict[str, list[Rule]] = {}
        # Runs of steps on one chain, so that an -x list's 8,000 appends are one extend.
        for (step_table, op, chain), run in groupby(self.steps, key=_TABLE_OP_CHAIN):
            if step_table != table:
                continue
            rules = chains.setdefault(chain, [])
            if op == INSERT:
                for step in run:
                    rules.insert(step.position - 1, step.rule)
            else:
                rules += map(_RULE, run)
        return chains


class PolicyRoute(NamedTuple):
    """TPROXY's `ip rule add fwmark MARK lookup TABLE` and its `local default dev lo` route."""

    family: int
    fwmark: int
    table: int


class RulePlan(NamedTuple):
    """Everything one run of istio-init installs."""

    ipv4: FamilyPlan
    ipv6: FamilyPlan | None = None
    routes: tuple[PolicyRoute, ...] = ()
    # Addresses added to `lo` (IPv6 pods get ::6, the inbound passthrough source).
    loopback_addresses: tuple[str, ...] = ()

    def families(self) -> list[FamilyPlan]:
        return [self.ipv4] if self.ipv6 is None else [self.ipv4, self.ipv6]
