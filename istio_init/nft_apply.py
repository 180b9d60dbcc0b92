"""`--native-nftables`: dry run, apply (re-run, converge) and clean through the nftables backend.

The sequence of an apply: take istio-init's lock, read our tables (JSON),
add the loopback address and TPROXY routes, load the whole plan as one
transaction (our tables deleted and re-added, so a re-run or a converge to
other flags is the same single kernel commit), then print that transaction,
as Istio's nft mode logs it. If the transaction is refused, the routes and
address added are removed and nothing else has changed (the kernel applies
all of it or none); if anything fails after the commit, the previous tables
are put back too (backend.restore, from the JSON read before). The routes go first because they are
harmless without the rules that mark packets, which leaves the kernel commit
as the one step that turns capture on.

This is the one place apply/clean branch to native nftables (runner.py calls
`run` and `clean` when the flag is set); everything kernel-side is in
backends/nftables.py.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from istio_init import apply
from istio_init.backends.nftables import NftablesBackend, OUR_TABLES, Undo
from istio_init.config import Config
from istio_init.errors import ApplyError
from istio_init.model import RulePlan
from istio_init.render_nft import FAMILY, TransactionLine, render_transaction

FAULT_ENV = apply.FAULT_ENV  # test-only: `reject:nft` (the last rule refused), `after-commit:nft`, `route`
_MANGLE = OUR_TABLES[1]
# Rule sets whose nft form keeps iptables' family scope: on an IPv4-only pod IPv6 is left alone.
_GUARDED_RULE_SETS = frozenset({"1.8"})


def guard_single_family(config: Config) -> bool:
    """Whether IPv4-only plans get `meta nfproto ipv4` (ours for 1.8; current Istio's text has none)."""
    from istio_init.rulesets import ruleset_for

    return ruleset_for(config).NAME in _GUARDED_RULE_SETS


def run(config: Config, rule_plan: RulePlan, ipv6: bool) -> None:
    """What runner.run does once the plan is made, when --native-nftables is on."""
    guard = guard_single_family(config)
    if config.dry_run:
        sys.stdout.write(render_transaction(rule_plan, guard))
        sys.stdout.flush()
        return
    if config.skip_rule_apply:
        apply.log("--skip-rule-apply: not applying any rules")
    else:
        install(rule_plan, guard)
    if config.run_validation:
        from istio_init import validation

        validation.run(config, ipv6)


def _divert_marks(objects: list[dict[str, Any]]) -> set[int]:
    """TPROXY marks our live `istio-divert` chain sets (their routes are ours to remove)."""
    marks = set()
    for obj in objects:
        rule = obj.get("rule")
        if not rule or rule["table"] != _MANGLE or rule["chain"] != "istio-divert":
            continue
        for expr in rule.get("expr", []):
            mangle = expr.get("mangle")
            if mangle and mangle.get("key") == {"meta": {"key": "mark"}} and isinstance(mangle.get("value"), int):
                marks.add(mangle["value"])
    return marks


def _with_rejected_last_rule(text: str, where: list[TransactionLine]) -> tuple[str, list[TransactionLine]]:
    """`reject:nft`: the transaction ends with a rule the kernel refuses (a jump to no chain)."""
    last = next(place for place in reversed(where) if place.rule)
    rule = "counter jump istio-no-such-chain-fault"
    line = f"add rule {FAMILY} {last.table} {last.chain} {rule}"
    return text + line + "\n", [*where, TransactionLine(last.table, last.chain, rule)]


def _failed(state: apply._Run, backend: NftablesBackend, undo: Undo | None, error: ApplyError) -> ApplyError:
    problems = state.rollback()  # the routes and address this run added
    if undo is not None:
        try:
            backend.restore(undo)
        except ApplyError as exc:
            problems.append(str(exc))
    if problems:
        return ApplyError(f"{error}; rollback incomplete: {'; '.join(problems)}")
    return ApplyError(f"{error} (everything changed in this run was put back)")


def install(rule_plan: RulePlan, guard: bool) -> None:
    """Apply, re-run or converge: our tables become exactly `rule_plan`'s, in one transaction."""
    apply.require_net_admin()
    backend = NftablesBackend(guard)
    fault = os.environ.get(FAULT_ENV, "")
    state = apply._Run(backend=None)  # type: ignore[arg-type]  # routes and addresses only
    text, where = backend.transaction(rule_plan)
    if fault == "reject:nft":
        text, where = _with_rejected_last_rule(text, where)
    rules = sum(1 for place in where if place.rule)
    apply.log(f"native nftables: one transaction, {rules} rules in table(s) "
              f"{', '.join(sorted({p.table for p in where if p.rule}, key=OUR_TABLES.index)) or '(none)'}")
    with apply.istio_lock():
        before = backend.ours()
        try:
            apply._apply_routing(state, rule_plan, _divert_marks(before), fault)
            backend.load(text, where)
        except ApplyError as exc:
            raise _failed(state, backend, None, exc) from None
        if fault == "after-commit:nft":  # the one step after the commit that can fail is a test's
            raise _failed(state, backend, Undo(tuple(before)), ApplyError(f"fault injected by {FAULT_ENV}={fault}"))
    # As Istio's nft mode logs the transaction it programmed: the text the kernel accepted, whole.
    sys.stdout.write(text)
    sys.stdout.flush()


def clean(config: Config) -> None:
    """Remove our tables (one transaction), the TPROXY routes of their marks and ::6."""
    apply.require_net_admin()
    backend = NftablesBackend()
    with apply.istio_lock():
        before = backend.ours()
        present = [obj["table"]["name"] for obj in before if "table" in obj]
        marks = _divert_marks(before) | {config.tproxy_mark}
        if config.dry_run:
            sys.stdout.write("".join(f"delete table {FAMILY} {name}\n" for name in present))
            apply._clean_routing(marks, dry_run=True)
            return
        undo = backend.remove()
        try:
            removed = apply._clean_routing(marks, dry_run=False)
        except ApplyError as exc:
            try:
                backend.restore(undo)
            except ApplyError as again:
                raise ApplyError(f"{exc}; restoring the tables failed too: {again}") from None
            raise ApplyError(f"{exc} (the tables were put back)") from None
    if present or removed:
        apply.log(f"clean (native nftables): removed {len(present)} table(s), {removed} route(s) or address(es)")
    else:
        apply.log("clean (native nftables): nothing to remove")
