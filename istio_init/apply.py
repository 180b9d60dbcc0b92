"""Applying a plan (and `clean`) all-or-nothing, in the namespace the process is in.

The sequence is: pick a backend, take istio-init's lock, snapshot every
family's tables (that snapshot is also the live state reconcile.py decides
from), commit each changed table once, then the loopback address and TPROXY
routes. If any step fails, every table touched in this run is restored from
the snapshot and the routes and addresses added are removed, so a pod never
starts with half a rule set. The lock serialises concurrent runs in one
namespace, which would otherwise both decide from the same old state.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from istio_init import locks
from istio_init.backends import base
from istio_init.config import Config
from istio_init.errors import ApplyError
from istio_init.model import APPEND, FamilyPlan, Rule, RulePlan, Step
from istio_init.reconcile import TableChange, reconcile, restore_text
from istio_init.savefile import SavedTable, parse_save

if TYPE_CHECKING:
    from istio_init.netns import Routing

# Test-only fault injection, read nowhere else: `after-commit:TABLE` fails right after
# the IPv4 commit of TABLE, `ipv6` after the first IPv6 table commit, `route` after
# the TPROXY route step has changed something, and `reject:TABLE` adds to the IPv4
# changes of TABLE a jump to a chain that does not exist, which the kernel or the
# restore tool refuses (the real error path). Never set in production.
FAULT_ENV = "ISTIO_INIT_FAULT"
LOCK_FILE = "/run/istio-init.lock"
LOCK_WAIT_SECONDS = 60
DIVERT_CHAIN = "ISTIO_DIVERT"
AUTO_LIBIPTC_MAX_RULES = 200


def log(message: str) -> None:
    print(f"istio-init: {message}", file=sys.stderr, flush=True)


# ---- backend choice -------------------------------------------------------------------

def _nft_has_rules(families: list[int]) -> bool:
    """Whether iptables-nft has made any of its tables in this namespace (asked over netlink)."""
    from istio_init import netns

    return any(netns.iptables_nft_tables(family) for family in families)


def _legacy_available(families: list[int]) -> bool:
    names = {4: "/proc/net/ip_tables_names", 6: "/proc/net/ip6_tables_names"}
    return all(os.path.exists(names[f]) for f in families)


def choose_backend(config: Config, families: list[int], rule_count: int = 0) -> tuple[str, str]:
    """(backend name, reason) for --iptables-backend, resolving `auto`.

    Large plans go to iptables-legacy-restore even where libiptc would do:
    python-iptables builds about 10 CIDR or 3 port rules per millisecond while
    the restore tool loads 1,400 rules in under 10 ms, so past
    AUTO_LIBIPTC_MAX_RULES the pod would wait for python-iptables (measured
    with scripts/bench; see README).
    """
    if config.iptables_backend != "auto":
        return config.iptables_backend, f"--iptables-backend {config.iptables_backend}"
    if _nft_has_rules(families):
        return "nft", "auto: the namespace already has iptables-nft tables"
    if not _legacy_available(families):
        return "nft", "auto: the kernel offers no legacy ip_tables"
    if rule_count > AUTO_LIBIPTC_MAX_RULES:
        return "legacy", (f"auto: {rule_count} rules, more than {AUTO_LIBIPTC_MAX_RULES}; "
                          "iptables-legacy-restore loads large plans faster than python-iptables builds them")
    return "libiptc", "auto: legacy tables work and the namespace has no iptables-nft rules"


_CAP_NET_ADMIN = 12


def require_net_admin() -> None:
    """Fail before touching anything when the kernel would refuse every change.

    Without CAP_NET_ADMIN each backend fails in its own way (python-iptables
    deep in a table handle, the restore tool at line 1, the rollback after
    it); one line that says what is missing is what a pod's log needs.
    """
    try:
        with open("/proc/self/status") as status:
            line = next(ln for ln in status if ln.startswith("CapEff:"))
    except (OSError, StopIteration):
        return  # cannot tell; let the kernel decide
    if not int(line.split()[1], 16) & (1 << _CAP_NET_ADMIN):
        raise ApplyError("needs CAP_NET_ADMIN (run as root with NET_ADMIN, as Istio's init container does; "
                         "-n prints the rules without privileges)")


# ---- locking, snapshots, faults -------------------------------------------------------

def istio_lock(timeout: float = LOCK_WAIT_SECONDS) -> contextlib.AbstractContextManager[None]:
    """One istio-init run at a time: read, decide and commit must not interleave."""
    return locks.held(os.environ.get("ISTIO_INIT_LOCKFILE") or LOCK_FILE, timeout, "another istio-init run")


def table_blocks(text: str, tables: list[str]) -> str:
    """The `*table ... COMMIT` blocks of `tables` from save text; empty blocks for absent ones."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = blocks.setdefault(line[1:].strip(), []) if line[1:].strip() in tables else None
        if current is not None and not line.startswith("#"):
            current.append(line)
        if line.strip() == "COMMIT":
            current = None
    return "".join("\n".join(blocks.get(t) or [f"*{t}", "COMMIT"]) + "\n" for t in tables)


def _with_rejected_rule(changes: list[TableChange], table: str) -> list[TableChange]:
    """`reject:TABLE`: the table's last rule is followed by a jump to a missing chain."""
    out = []
    for change in changes:
        if change.table == table and change.steps:
            bogus = Step(APPEND, Rule(table, change.steps[-1].rule.chain, "NO_SUCH_CHAIN_FAULT"))
            change = change._replace(steps=(*change.steps, bogus))
        out.append(change)
    return out


def _fault_hook(fault: str) -> base.CommitHook:
    def after_commit(family: int, table: str) -> None:
        if (family == 4 and fault == f"after-commit:{table}") or (family == 6 and fault == "ipv6"):
            raise ApplyError(f"table {table}: fault injected by {FAULT_ENV}={fault}")
    return after_commit


@dataclass
class _Run:
    """What one apply or clean changed so far, so it can be undone."""

    backend: base.Backend
    snapshots: dict[int, str] = field(default_factory=dict)
    changes: dict[int, list[TableChange]] = field(default_factory=dict)
    added_routing: list[Routing] = field(default_factory=list)
    removed_routing: list[Routing] = field(default_factory=list)
    added_addresses: list[str] = field(default_factory=list)
    removed_addresses: list[str] = field(default_factory=list)

    def read(self, families: list[int]) -> dict[int, dict[str, SavedTable]]:
        live = {}
        for family in families:
            self.snapshots[family] = self.backend.read(family)
            live[family] = parse_save(self.snapshots[family])
        return live

    def rollback(self) -> list[str]:
        """Undo everything; returns the problems met (rollback goes on past them)."""
        problems = []
        if self.added_routing or self.removed_routing or self.added_addresses or self.removed_addresses:
            from istio_init import netns

            steps = [(lambda: netns.remove_routing(list(reversed(self.added_routing)))),
                     *[(lambda r=r: netns.add_policy_route(r.family, r.fwmark, r.table))
                       for r in self.removed_routing if r.kind == "rule"],
                     *[(lambda a=a: netns.remove_loopback_address(a)) for a in self.added_addresses],
                     *[(lambda a=a: netns.add_loopback_address(a)) for a in self.removed_addresses]]
            for step in steps:
                try:
                    step()
                except Exception as exc:  # keep undoing the rest
                    problems.append(str(exc))
        for family, changes in self.changes.items():
            tables = [c.table for c in changes]
            if not tables:
                continue
            try:
                self.backend.restore(family, table_blocks(self.snapshots[family], tables))
            except ApplyError as exc:
                problems.append(str(exc))
        return problems


def _fail(run: _Run, error: ApplyError) -> ApplyError:
    problems = run.rollback()
    if problems:
        return ApplyError(f"{error}; rollback incomplete: {'; '.join(problems)}")
    return ApplyError(f"{error} (everything changed in this run was put back)")


# ---- apply ----------------------------------------------------------------------------

def _divert_marks(live_v4: dict[str, SavedTable]) -> set[int]:
    """TPROXY marks set by live ISTIO_DIVERT rules (found by clean and by a re-run)."""
    marks = set()
    table = live_v4.get("mangle")
    for spec in table.chain_rules(DIVERT_CHAIN) if table else []:
        words = spec.split()
        if "--set-xmark" in words:
            marks.add(int(words[words.index("--set-xmark") + 1].split("/")[0], 16))
    return marks


def run(config: Config, rule_plan: RulePlan) -> None:
    """Install `rule_plan` in the current namespace, converging from whatever is there."""
    if config.skip_rule_apply:
        log("--skip-rule-apply: not applying any rules")
        return
    require_net_admin()
    plans = {family.family: family for family in rule_plan.families()}
    families = list(plans)
    name, reason = choose_backend(config, families, sum(len(f.steps) for f in plans.values()))
    log(f"iptables backend {name} ({reason})")
    backend = base.get(name)
    fault = os.environ.get(FAULT_ENV, "")
    state = _Run(backend)
    with istio_lock():
        with backend.session():
            live = state.read(families)
            state.changes = {f: reconcile(live[f], plans[f]) for f in families}
            if fault.startswith("reject:"):
                state.changes[4] = _with_rejected_rule(state.changes[4], fault.split(":", 1)[1])
            try:
                backend.apply(state.changes, _fault_hook(fault))
                error = None
            except ApplyError as exc:
                error = exc
        if error:
            raise _fail(state, error)
        try:
            _apply_routing(state, rule_plan, _divert_marks(live[4]), fault)
        except ApplyError as exc:
            raise _fail(state, exc) from None
    _print_tables(backend, plans, state.changes)


def _apply_routing(state: _Run, rule_plan: RulePlan, live_marks: set[int], fault: str) -> None:
    planned = {route.fwmark for route in rule_plan.routes}
    stale = live_marks - planned
    if not (rule_plan.loopback_addresses or rule_plan.routes or stale):
        return  # the common case: no pyroute2 at all
    from istio_init import netns

    step = "loopback address"
    try:
        for address in rule_plan.loopback_addresses:
            step = f"address {address} on lo"
            if netns.add_loopback_address(address):
                state.added_addresses.append(address)
        for route in rule_plan.routes:
            step = f"policy route fwmark {route.fwmark:#x} lookup {route.table}"
            state.added_routing += netns.add_policy_route(route.family, route.fwmark, route.table)
        if stale:
            step = "removing the policy routes of earlier TPROXY marks"
            found = [*netns.policy_routing_for_marks(4, stale), *netns.policy_routing_for_marks(6, stale)]
            netns.remove_routing(found)
            state.removed_routing += found
        if fault == "route":
            raise ApplyError(f"fault injected by {FAULT_ENV}=route")
    except ApplyError as exc:
        raise ApplyError(f"route step, {step}: {exc}") from None
    except Exception as exc:  # NetlinkError, OSError from pyroute2
        raise ApplyError(f"route step, {step}: {exc}") from None


def _print_tables(backend: base.Backend, plans: dict[int, FamilyPlan], changes: dict[int, list[TableChange]]) -> None:
    """Istio prints iptables-save (and ip6tables-save) after applying; so do we, for our tables."""
    out = []
    for family, plan in plans.items():
        tables = list(dict.fromkeys([*plan.tables(), *(c.table for c in changes.get(family, []))]))
        text = base.save_text(backend.tools, family, counters=False)
        if family == 6:
            out.append("# IPv6\n")
        out.append(table_blocks(text, tables))
    sys.stdout.write("".join(out))
    sys.stdout.flush()


# ---- clean ----------------------------------------------------------------------------

def clean(config: Config, dry_run: bool = False) -> None:
    """Remove every ISTIO_ chain, every jump to one, our built-in rules, routes and ::6."""
    families = [4, 6]
    if config.iptables_backend == "auto":
        flavours = ["legacy"] if _legacy_available(families) else []
        if not flavours or _nft_has_rules(families):
            flavours.append("nft")
    else:
        flavours = [config.iptables_backend]
    removed = 0
    marks = {config.tproxy_mark}
    require_net_admin()
    with istio_lock():
        for flavour in flavours:
            backend = base.get(flavour)
            state = _Run(backend)
            with backend.session():
                live = state.read(families)
                state.changes = {f: reconcile(live[f], None) for f in families}
                if dry_run:
                    _print_clean(flavour, state.changes)
                    marks |= _divert_marks(live[4])
                    continue
                try:
                    backend.apply(state.changes, lambda family, table: None)
                    error = None
                except ApplyError as exc:
                    error = exc
            if error:
                raise _fail(state, error)
            removed += sum(len(c) for c in state.changes.values())
            marks |= _divert_marks(live[4])
        removed += _clean_routing(marks, dry_run)
    if not dry_run:
        log(f"clean: {'changed ' + str(removed) + ' table(s) or route(s)' if removed else 'nothing to remove'}")


def _print_clean(flavour: str, changes: dict[int, list[TableChange]]) -> None:
    for family, family_changes in changes.items():
        text = restore_text(family_changes)
        if text:
            sys.stdout.write(f"# {'ip6' if family == 6 else 'ip'}tables-{flavour}-restore --noflush\n{text}")


def _clean_routing(marks: set[int], dry_run: bool) -> int:
    from istio_init import netns
    from istio_init.rulesets.istio_1_8 import IPV6_PASSTHROUGH_ADDRESS

    # The current rule set routes TPROXY marks in IPv6 too.
    found = [*netns.policy_routing_for_marks(4, marks), *netns.policy_routing_for_marks(6, marks)]
    has_address = netns.has_loopback_address(IPV6_PASSTHROUGH_ADDRESS)
    if dry_run:
        for item in found:
            sys.stdout.write(f"# remove {item}\n")
        if has_address:
            sys.stdout.write(f"# remove address {IPV6_PASSTHROUGH_ADDRESS} from lo\n")
        return 0
    try:
        netns.remove_routing(found)
        if has_address:
            netns.remove_loopback_address(IPV6_PASSTHROUGH_ADDRESS)
    except Exception as exc:  # NetlinkError, OSError from pyroute2
        raise ApplyError(f"clean: removing TPROXY routing or {IPV6_PASSTHROUGH_ADDRESS}: {exc}") from None
    return len(found) + int(has_address)
