"""Deciding what to change: live state (parsed iptables-save) + plan -> per-table changes.

An init container is restarted whenever its pod sandbox is re-created, so a
run must converge whatever it finds: the rules of an earlier run with the same
flags, with other flags, or none. Deciding that is a pure function over the
parsed `iptables-save` text, so it is tested without a kernel and every backend
executes the same decision. A rule is "ours" when it sits in an ISTIO_ chain,
jumps to one, or has one of the few shapes the planner puts into built-in
chains without an ISTIO_ jump; everything else is left exactly where it is.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from istio_init.model import INSERT, FamilyPlan, Step
from istio_init.render import rule_spec
from istio_init.savefile import SavedTable

ISTIO_PREFIX = "ISTIO_"

# Shapes the planner writes into built-in chains that do not jump to an ISTIO_ chain
# (RULES.md steps 2, 18 and 19), keyed by (table, chain).
_BUILTIN_SHAPES: dict[tuple[str, str], tuple[re.Pattern[str], ...]] = {
    ("nat", "PREROUTING"): (re.compile(r"-i \S+ -j RETURN"),),
    ("nat", "OUTPUT"): (
        re.compile(r"-p udp -m udp --dport 53 -m owner --(?:uid|gid)-owner \d+ -j RETURN"),
        re.compile(r"-p udp -m udp --dport 53 -j DNAT --to-destination 127\.0\.0\.1:15053"),
    ),
    ("nat", "POSTROUTING"): (re.compile(r"-p udp -m udp --dport 15053 -j SNAT --to-source 127\.0\.0\.1"),),
    ("mangle", "OUTPUT"): (
        re.compile(r"-s 127\.0\.0\.1/32 ! -d 127\.0\.0\.1/32 -p tcp -j MARK --set-xmark \S+"),
    ),
}
# The current rule set's (RULES-CURRENT.md steps 1 and 17): -c interfaces and the TPROXY marks.
_CONNMARK_MASKS = r"--nfmask 0xffffffff --ctmask 0xffffffff"
_CURRENT_SHAPES: dict[tuple[str, str], tuple[str, ...]] = {
    ("nat", "OUTPUT"): (r"-o \S+ -j RETURN",),
    ("mangle", "PREROUTING"): (r"-i \S+ -j RETURN",
                               rf"-p tcp -m mark --mark \S+ -j CONNMARK --save-mark {_CONNMARK_MASKS}"),
    ("mangle", "OUTPUT"): (r"-o \S+ -j RETURN", r"-o lo -p tcp -m mark --mark \S+ -j RETURN",
                           r"! -d \S+ -o lo -p tcp -m owner --(?:uid|gid)-owner \d+ -j MARK --set-xmark \S+",
                           rf"-p tcp -m connmark --mark \S+ -j CONNMARK --restore-mark {_CONNMARK_MASKS}"),
}
_BUILTIN_SHAPES = {key: _BUILTIN_SHAPES.get(key, ()) + tuple(re.compile(p) for p in _CURRENT_SHAPES.get(key, ()))
                   for key in {*_BUILTIN_SHAPES, *_CURRENT_SHAPES}}
_JUMP = re.compile(r"(?:^|\s)-[jg] (\S+)")


def jump_target(spec: str) -> str | None:
    match = _JUMP.search(spec)
    return match.group(1) if match else None


def is_ours(table: str, chain: str, spec: str) -> bool:
    """Whether istio-init made this live rule (and may delete it)."""
    if chain.startswith(ISTIO_PREFIX):
        return True
    target = jump_target(spec)
    if target and target.startswith(ISTIO_PREFIX):
        return True
    return any(p.fullmatch(spec) for p in _BUILTIN_SHAPES.get((table, chain), ()))


class TableChange(NamedTuple):
    """One table's transaction: run in field order, committed at once."""

    table: str
    # (chain, 1-based rule number) outside ISTIO_ chains, highest number first within a chain,
    # so each deletion leaves the numbers still to delete valid.
    delete_rules: tuple[tuple[str, int], ...]
    # ISTIO_ chains the plan uses: flushed when they exist, created otherwise.
    flush_chains: tuple[str, ...]
    create_chains: tuple[str, ...]
    # ISTIO_ chains the plan no longer uses: all flushed first, then deleted.
    delete_chains: tuple[str, ...]
    steps: tuple[Step, ...]


def _ours_in_table(table: SavedTable) -> list[tuple[str, int]]:
    """(chain, 1-based number) of our rules outside ISTIO_ chains, highest first per chain.

    That is our rules in built-in chains, and jumps to ISTIO_ chains from
    anyone's chain (an ISTIO_ chain cannot be deleted while referenced).
    """
    found: list[tuple[str, int]] = []
    numbers: dict[str, int] = {}
    for chain, spec in table.rules:
        numbers[chain] = numbers.get(chain, 0) + 1
        if not chain.startswith(ISTIO_PREFIX) and is_ours(table.name, chain, spec):
            found.append((chain, numbers[chain]))
    return sorted(found, key=lambda item: (item[0], -item[1]))


State = tuple[frozenset[str], dict[str, tuple[str, ...]]]


def simulate(live: SavedTable | None, change: TableChange | None = None) -> State:
    """The table's (user chains, non-empty chains' rules) after `change`, without a kernel."""
    chains = set(live.user_chains()) if live else set()
    rules: dict[str, list[str]] = {}
    for chain, spec in (live.rules if live else []):
        rules.setdefault(chain, []).append(spec)
    if change is not None:
        for chain, number in change.delete_rules:
            del rules[chain][number - 1]
        for chain in (*change.flush_chains, *change.delete_chains):
            rules.pop(chain, None)
        chains = (chains - set(change.delete_chains)) | set(change.create_chains)
        for step in change.steps:
            chain_rules = rules.setdefault(step.rule.chain, [])
            if step.op == INSERT:
                chain_rules.insert(step.position - 1, rule_spec(step.rule))
            else:
                chain_rules.append(rule_spec(step.rule))
    return frozenset(chains), {c: tuple(r) for c, r in rules.items() if r}


def reconcile(live: dict[str, SavedTable], family: FamilyPlan | None) -> list[TableChange]:
    """The changes that turn `live` into exactly one run of `family` (None: remove ours).

    Tables are returned in plan order, then tables holding only stale rules of
    ours. A table already in the wanted state is left out, so a re-run with
    the same flags commits nothing.
    """
    planned = family.tables() if family else []
    stale = [name for name, table in live.items() if name not in planned and (
        any(c.startswith(ISTIO_PREFIX) for c in table.user_chains())
        or any(is_ours(name, c, s) for c, s in table.rules))]
    changes = []
    for name in planned + stale:
        table = live.get(name)
        existing = set(table.user_chains()) if table else set()
        wanted = family.chains(name) if family and name in planned else []
        ours_existing = [c for c in (table.user_chains() if table else []) if c.startswith(ISTIO_PREFIX)]
        change = TableChange(
            table=name,
            delete_rules=tuple(_ours_in_table(table)) if table else (),
            flush_chains=tuple(c for c in wanted if c in existing),
            create_chains=tuple(c for c in wanted if c not in existing),
            delete_chains=tuple(c for c in ours_existing if c not in wanted),
            steps=tuple(s for s in family.steps if s.rule.table == name) if family and name in planned else (),
        )
        if simulate(table, change) != simulate(table):
            changes.append(change)
    return changes


def restore_text(changes: list[TableChange]) -> str:
    """`iptables-restore --noflush` input for the changes, one block per table.

    A `:CHAIN - [0:0]` line creates a user chain, or flushes it when it exists,
    which is exactly what the plan's chains need.
    """
    lines: list[str] = []
    for change in changes:
        lines.append(f"*{change.table}")
        lines += [f":{chain} - [0:0]" for chain in (*change.flush_chains, *change.create_chains)]
        lines += [f"-D {chain} {number}" for chain, number in change.delete_rules]
        lines += [f"-F {chain}" for chain in change.delete_chains]
        lines += [f"-X {chain}" for chain in change.delete_chains]
        for step in change.steps:
            where = f"-I {step.rule.chain} {step.position}" if step.op == INSERT else f"-A {step.rule.chain}"
            lines.append(f"{where} {rule_spec(step.rule)}")
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""
