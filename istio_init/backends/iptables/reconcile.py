"""Deciding what to change: live state (parsed iptables-save) + plan -> per-table changes.

An init container is restarted whenever its pod sandbox is re-created, so a
run must converge whatever it finds: the rules of an earlier run with the same
flags, with other flags, of another rule set, or none. Deciding that is a pure
function over the parsed `iptables-save` text, so it is tested without a
kernel and every iptables backend executes the same decision. A rule is
istio-init's when it sits in a chain a rule set owns, jumps to one, or is
exactly a shape a rule set writes into a built-in chain (rulesets/ownership.py);
everything else, a user's `ISTIO_FOO` chain included, is left where it is.
"""

from __future__ import annotations

import itertools
import _operator as operator  # operator.py only re-exports the C module's

from istio_init.model import APPEND, INSERT, DestinationRun, FamilyPlan, Step, is_builtin, step_segments
from istio_init.records import TYPE_CHECKING, NamedTuple
from istio_init.iptables_save.write import rule_spec
from istio_init.rulesets import owned_chains
from istio_init.iptables_save.read import SavedRule, SavedTable

if TYPE_CHECKING:
    import re
    from typing import Mapping, Sequence

# Built once per key, when a run first needs them (None: every rule set's).
_SHAPES: dict[tuple[str, ...] | None, dict[tuple[str, str], tuple[re.Pattern[str], ...]]] = {}
# The rule sets whose built-in rules are looked at first: planning all ten to learn their shapes
# costs tens of milliseconds, and a live rule is nearly always one of these or a jump.
_FIRST_RULE_SETS = ("1.8", "current")


def _builtin_shapes(rule_sets: tuple[str, ...] | None) -> dict[tuple[str, str], tuple[re.Pattern[str], ...]]:
    """Each planned built-in rule as a pattern: its text, with every sentinel part matching any word.

    Only a namespace with rules in built-in chains needs them (a fresh pod's has none), so `re`
    is imported here, not on every start.
    """
    if rule_sets in _SHAPES:
        return _SHAPES[rule_sets]
    import re

    from istio_init.rulesets.ownership import SENTINEL_WORDS, builtin_rules

    any_word = "|".join(re.escape(word) for word in sorted(SENTINEL_WORDS, key=len, reverse=True))
    shapes: dict[tuple[str, str], tuple[re.Pattern[str], ...]] = {}
    for key, rules in builtin_rules(rule_sets).items():
        patterns = []
        for rule in rules:
            parts = re.split(f"({any_word})", rule_spec(rule))
            patterns.append("".join(r"\S+" if i % 2 else re.escape(part) for i, part in enumerate(parts)))
        shapes[key] = tuple(re.compile(p) for p in dict.fromkeys(patterns))
    _SHAPES[rule_sets] = shapes
    return shapes


def jump_target(rule: SavedRule) -> str | None:
    words = rule.spec.split()
    for flag in ("-j", "-g"):
        if flag in words and words.index(flag) + 1 < len(words):
            return words[words.index(flag) + 1]
    return None


def is_ours(table: str, chain: str, spec: str) -> bool:
    """Whether istio-init made this live rule (and may delete it)."""
    return _is_ours(table, SavedRule(table, chain, spec))


def _is_ours(table: str, rule: SavedRule) -> bool:
    owned = owned_chains(table)
    if rule.chain in owned or jump_target(rule) in owned:
        return True
    if not is_builtin(table, rule.chain):
        return False
    return any(any(p.fullmatch(rule.spec) for p in _builtin_shapes(rule_sets).get((table, rule.chain), ()))
               for rule_sets in (_FIRST_RULE_SETS, None))


class TableChange(NamedTuple):
    """One table's transaction: run in field order, committed at once."""

    table: str
    # (chain, 1-based rule number) outside owned chains, highest number first within a chain,
    # so each deletion leaves the numbers still to delete valid.
    delete_rules: tuple[tuple[str, int], ...]
    # Owned chains the plan uses: flushed when they exist, created otherwise.
    flush_chains: tuple[str, ...]
    create_chains: tuple[str, ...]
    # Owned chains the plan no longer uses: all flushed first, then deleted.
    delete_chains: tuple[str, ...]
    steps: tuple[Step, ...]
    # Each step's rule spelled (rule_spec), in step order: spelled once, here, for the
    # simulation, the restore text and the printed tables (an -x list makes 8,000 of them).
    specs: tuple[str, ...] = ()
    # The table once committed, as `simulate` gives it (reconcile fills it in, and the printed
    # tables are spelled from it, so 8,000 planned rules are not simulated a second time).
    after: "State | None" = None

    def spelled(self) -> tuple[str, ...]:
        """`specs`, or the steps spelled now for a change made without them."""
        if len(self.specs) == len(self.steps):
            return self.specs
        return spell(self.steps)


def _ours_in_table(table: SavedTable) -> list[tuple[str, int]]:
    """(chain, 1-based number) of our rules outside owned chains, highest first per chain.

    That is our rules in built-in chains, and jumps to owned chains from
    anyone's chain (an owned chain cannot be deleted while referenced).
    """
    owned = owned_chains(table.name)
    found: list[tuple[str, int]] = []
    numbers: dict[str, int] = {}
    for rule in table.rules:
        numbers[rule.chain] = numbers.get(rule.chain, 0) + 1
        if rule.chain not in owned and _is_ours(table.name, rule):
            found.append((rule.chain, numbers[rule.chain]))
    return sorted(found, key=lambda item: (item[0], -item[1]))


State = tuple[frozenset[str], dict[str, tuple[str, ...]]]


def simulate(live: SavedTable | None, change: TableChange | None = None) -> State:
    """The table's (user chains, non-empty chains' rules) after `change`, without a kernel."""
    chains = set(live.user_chains()) if live else set()
    rules: dict[str, list[str]] = {}
    for saved in (live.rules if live else []):
        rules.setdefault(saved.chain, []).append(saved.spec)
    if change is not None:
        for chain, number in change.delete_rules:
            del rules[chain][number - 1]
        for chain in (*change.flush_chains, *change.delete_chains):
            rules.pop(chain, None)
        chains = (chains - set(change.delete_chains)) | set(change.create_chains)
        specs = change.spelled()
        done = 0
        for (op, chain), run in _runs(change.steps):  # an -x list is one run of 8,000 appends
            chain_rules = rules.setdefault(chain, [])
            if op == INSERT:
                for step, spec in zip(run, specs[done:done + len(run)]):
                    chain_rules.insert(step.position - 1, spec)
            else:
                chain_rules += specs[done:done + len(run)]
            done += len(run)
    return frozenset(chains), {c: tuple(r) for c, r in rules.items() if r}


def reconcile(live: dict[str, SavedTable], family: FamilyPlan | None) -> list[TableChange]:
    """The changes that turn `live` into exactly one run of `family` (None: remove ours).

    Tables are returned in plan order, then tables holding only stale rules of
    ours. A table already in the wanted state is left out, so a re-run with
    the same flags commits nothing.
    """
    planned = family.tables() if family else []
    stale = [name for name, table in live.items() if name not in planned and (
        any(c in owned_chains(name) for c in table.user_chains())
        or any(_is_ours(name, rule) for rule in table.rules))]
    changes = []
    for name in planned + stale:
        table = live.get(name)
        existing = set(table.user_chains()) if table else set()
        wanted = family.chains(name) if family and name in planned else []
        ours_existing = [c for c in (table.user_chains() if table else []) if c in owned_chains(name)]
        if family and name in planned:
            steps = family.steps if len(planned) == 1 else _table_steps(family.steps, name)
        else:
            steps = ()
        change = TableChange(
            table=name,
            delete_rules=tuple(_ours_in_table(table)) if table else (),
            flush_chains=tuple(c for c in wanted if c in existing),
            create_chains=tuple(c for c in wanted if c not in existing),
            delete_chains=tuple(c for c in ours_existing if c not in wanted),
            steps=steps,
            specs=spell(steps),
        )
        after = simulate(table, change)
        if after != simulate(table):
            changes.append(change._replace(after=after))
    return changes


def _table_steps(steps: Sequence[Step], table: str) -> tuple[Step, ...]:
    """The steps on `table`, in order; a destination run is kept or left out whole."""
    kept: list[Step] = []
    for start, end, run in step_segments(steps):
        if run is None:
            kept += [step for step in steps[start:end] if step.rule.table == table]
        elif run.steps[0].rule.table == table:
            kept += steps[start:end]
    return tuple(kept)


def tables_hold_ours(tables: Mapping[str, SavedTable]) -> bool:
    """Whether parsed tables hold a chain istio-init owns or any rule of istio-init's."""
    for name, table in tables.items():
        if any(chain in owned_chains(name) for chain in table.user_chains()):
            return True
        if reconcile({name: table}, None):
            return True
    return False


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
        lines += _step_lines(change)
        lines.append("COMMIT")
    if not lines:
        return ""
    lines.append("")  # the last newline, without copying 8,000 rules' text to add it
    return "\n".join(lines)


def _runs(steps: Sequence[Step]) -> list[tuple[tuple[str, str], list[Step]]]:
    """Consecutive steps with the same (op, chain), grouped without Python code per step.

    A run destination_appends made (an -x list) comes as one group without being walked.
    """
    groups: list[tuple[tuple[str, str], list[Step]]] = []
    for start, end, run in step_segments(steps):
        if run is not None:
            groups.append(((APPEND, run.steps[0].rule.chain), list(steps[start:end])))
        else:
            groups += [(key, list(group)) for key, group in itertools.groupby(steps[start:end], key=_OP_CHAIN)]
    return groups


def spell(steps: Sequence[Step]) -> tuple[str, ...]:
    """Each step's rule_spec, in order; a destination run's all at once, by one join and one split."""
    specs: list[str] = []
    for start, end, run in step_segments(steps):
        if run is None:
            specs += map(rule_spec, map(_RULE, steps[start:end]))
        else:
            tail = f" -j {run.steps[0].rule.target}"
            specs += ("-d " + f"{tail}\n-d ".join(run.destinations) + tail).split("\n")
    return tuple(specs)


_OP_CHAIN = operator.attrgetter("op", "rule.chain")
_RULE = operator.attrgetter("rule")
# The restore tools take `-d A,B,C` as one rule per address, in order, and parse such a line far
# faster than one line per rule (8,000 -x CIDRs: half the tool's time). xtables refuses a parameter
# of 1,024 characters or more ("Parameter too long!").
MAX_PARAMETER = 1000


def _step_lines(change: TableChange) -> list[str]:
    """`-I CHAIN N SPEC` and `-A CHAIN SPEC` lines in step order, a run of appends to one chain joined at once.

    A run destination_appends made is written as `-A CHAIN -d A,B,... -j TARGET` lines.
    """
    lines: list[str] = []
    specs = change.spelled()
    for start, end, run in step_segments(change.steps):
        if run is not None:
            lines += _destination_lines(run)
            continue
        done = start
        for (op, chain), grouped in itertools.groupby(change.steps[start:end], key=_OP_CHAIN):
            group = list(grouped)
            count = len(group)
            if op == INSERT:
                lines += [f"-I {chain} {step.position} {spec}" for step, spec in zip(group, specs[done:done + count])]
            else:
                lines.append(f"-A {chain} " + f"\n-A {chain} ".join(specs[done:done + count]))
            done += count
    return lines


def _destination_lines(run: DestinationRun) -> list[str]:
    """A destination run as `-A CHAIN -d A,B,... -j TARGET` lines, each address list under MAX_PARAMETER."""
    rule = run.steps[0].rule
    per_line = max(1, MAX_PARAMETER // (max(map(len, run.destinations)) + 1))
    dests = run.destinations
    return [f"-A {rule.chain} -d {','.join(dests[i:i + per_line])} -j {rule.target}"
            for i in range(0, len(dests), per_line)]
