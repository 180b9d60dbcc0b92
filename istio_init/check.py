"""`istio-init check`: does the namespace still hold exactly what these flags install?

Something on the node (a CNI plugin, a node agent, a person) can flush or
reorder a pod's rules after the init container ran, and nothing notices.
`check` reads the live state once and compares it with the plan: missing,
extra and misordered rules (table, chain, position, rule text), missing or
extra chains, the TPROXY policy rule and route, and `::6` on lo.

Only istio-init's rules count: every rule in its chains (so a foreign rule
inside ISTIO_INBOUND is drift), and in built-in chains the rules it plans or
recognises as its own (`reconcile.is_ours`). Other rules in built-in chains,
and other chains, are the user's and never drift.

The comparison (`compare`) is pure: it takes the planned state and the live
state as data, so it is tested without a kernel. Reading the kernel is
`read_state`, the one function here that does I/O, kept small so it can move
onto the backends' `read()`.
"""

from __future__ import annotations

from istio_init.backends.iptables.tools import command
from istio_init.errors import CheckError, IstioInitError
from istio_init.installed import FLAVOURS
from istio_init.model import FamilyPlan, RulePlan, is_builtin
from istio_init.records import TYPE_CHECKING, NamedTuple
from istio_init.iptables_save.write import chain_order, rule_spec
from istio_init.rulesets import owned_chains

if TYPE_CHECKING:
    from typing import Any, ContextManager, Mapping

    from istio_init import installed
    from istio_init.iptables_save.read import SavedTable
    from istio_init.config import Config
    from istio_init.host.routing import Routing
    from istio_init.runner import Log

# table -> chain -> rule specs (the text after `-A CHAIN`) in kernel order; chains listed even when empty.
Chains = dict[str, dict[str, list[str]]]

IN_SYNC = 0
DRIFTED = 1
LOCK_WAIT_SECONDS = 5  # never hold up an apply (or a probe) for long


class Planned(NamedTuple):
    """What the flags would install: rules per family, routing and loopback addresses."""

    rules: dict[int, Chains]
    routing: frozenset[Routing]
    addresses: frozenset[str]


class Live(NamedTuple):
    """What the namespace holds. A flavour or family the kernel does not offer is absent."""

    rules: dict[str, dict[int, Chains]]  # flavour -> family -> chains
    routing: frozenset[Routing]
    addresses: frozenset[str]
    store: str = "legacy"  # the flavour holding istio-init's rules (installed.py's policy)


class Difference(NamedTuple):
    """One way the live state differs from the plan."""

    kind: str  # "missing", "extra" or "misordered"
    what: str  # "rule", "chain", "routing" or "address"
    text: str  # the rule spec, the chain name, the route or the address
    flavour: str | None = None
    family: int | None = None
    table: str | None = None
    chain: str | None = None
    position: int | None = None  # missing: planned position; extra, misordered: position in the live chain
    planned_position: int | None = None  # misordered only

    def line(self) -> str:
        """`missing    iptables-legacy nat ISTIO_OUTPUT rule 4: -m owner ...`, and the like."""
        if self.what in ("routing", "address"):
            return f"{self.kind:<11}{self.what} {self.text}"
        tool = "nft inet" if self.flavour == "nftables" else command(self.family or 4, f"-{self.flavour}")
        if self.what == "chain":
            return f"{self.kind:<11}{tool} {self.table} chain {self.chain}"
        planned = f" (planned {self.planned_position})" if self.kind == "misordered" else ""
        return f"{self.kind:<11}{tool} {self.table} {self.chain} rule {self.position}{planned}: {self.text}"


class Report(NamedTuple):
    flavour: str  # the flavour the rules were expected in
    differences: tuple[Difference, ...]
    planned: Planned
    hint: str = ""  # what the operator most likely meant, when the state suggests it

    @property
    def in_sync(self) -> bool:
        return not self.differences

    @property
    def exit_code(self) -> int:
        return IN_SYNC if self.in_sync else DRIFTED


# --------------------------------------------------------------------------- the two sides as data


def chains_from_plan(family: FamilyPlan) -> Chains:
    """The plan's chains (built-in ones holding rules, and every new chain) as rule text."""
    chains: Chains = {}
    for table in family.tables():
        final = family.final_rules(table)
        by_chain: dict[str, list[str]] = {chain: [] for chain in family.chains(table)}
        by_chain.update({chain: [rule_spec(rule) for rule in rules] for chain, rules in final.items()})
        chains[table] = by_chain
    return chains


def chains_from_tables(tables: Mapping[str, SavedTable]) -> Chains:
    """Parsed live tables as rule text per table and chain (every chain, even empty ones)."""
    chains: Chains = {}
    for name, table in tables.items():
        by_chain: dict[str, list[str]] = {chain: [] for chain in table.chains}
        for saved in table.rules:
            by_chain.setdefault(saved.chain, []).append(saved.spec)
        chains[name] = by_chain
    return chains


def chains_from_save(text: str) -> Chains:
    """iptables-save text as rule text per table and chain."""
    from istio_init.iptables_save.read import parse_save

    return chains_from_tables(parse_save(text))


def planned_state(rule_plan: RulePlan) -> Planned:
    from istio_init.host.routing import planned_routing

    return Planned({family.family: chains_from_plan(family) for family in rule_plan.families()},
                   planned_routing(rule_plan.routes), frozenset(rule_plan.loopback_addresses))


# --------------------------------------------------------------------------- the comparison


def is_own_chain(table: str, chain: str) -> bool:
    """A chain some rule set of istio-init creates: every rule in it is istio-init's business.

    A user's ISTIO_FOO chain is not one (ownership comes from the rule sets, as in reconcile).
    """
    return not is_builtin(table, chain) and chain in owned_chains(table)


def _ours(table: str, chain: str, live: list[str], planned: list[str]) -> list[tuple[int, str]]:
    """(1-based live position, spec) of istio-init's rules in one live chain."""
    if is_own_chain(table, chain):
        return list(enumerate(live, 1))
    from istio_init.backends.iptables.reconcile import is_ours  # after the save tools started (run)

    wanted = set(planned)
    return [(n, spec) for n, spec in enumerate(live, 1) if spec in wanted or is_ours(table, chain, spec)]


def _keyed(specs: list[str]) -> list[tuple[str, int]]:
    """Each spec with its occurrence number, so duplicated rules pair up one to one."""
    seen: dict[str, int] = {}
    keys = []
    for spec in specs:
        seen[spec] = seen.get(spec, 0) + 1
        keys.append((spec, seen[spec]))
    return keys


def compare_chain(planned: list[str], live: list[tuple[int, str]]) -> list[Difference]:
    """Missing, extra and misordered rules of one chain (table, chain, flavour and family left blank).

    Rules present on both sides are compared in order once the missing and
    extra ones are set aside; each rule whose rank differs is misordered, so
    two swapped rules are both named.
    """
    planned_keys = _keyed(planned)
    live_keys = _keyed([spec for _, spec in live])
    common = set(planned_keys) & set(live_keys)
    planned_at = {key: n for n, key in enumerate(planned_keys, 1)}
    live_at = {key: live[i][0] for i, key in enumerate(live_keys)}
    found = [Difference("missing", "rule", key[0], position=planned_at[key])
             for key in planned_keys if key not in common]
    found += [Difference("extra", "rule", key[0], position=live_at[key]) for key in live_keys if key not in common]
    planned_common = [key for key in planned_keys if key in common]
    live_common = [key for key in live_keys if key in common]
    found += [Difference("misordered", "rule", got[0], position=live_at[got], planned_position=planned_at[got])
              for want, got in zip(planned_common, live_common) if want != got]
    return found


def _compare_table(table: str, planned: dict[str, list[str]], live: dict[str, list[str]] | None) -> list[Difference]:
    live = live or {}
    found: list[Difference] = []
    own_live = [c for c in live if is_own_chain(table, c)]
    for chain in chain_order(table, list(planned)):
        if not is_builtin(table, chain) and chain not in live:
            found.append(Difference("missing", "chain", chain, table=table, chain=chain))
    for chain in own_live:
        if chain not in planned:
            found.append(Difference("extra", "chain", chain, table=table, chain=chain))
    # The user's chains are never looked at; built-in chains only for istio-init's rules.
    looked_at = [*planned, *(c for c in live if c not in planned and (is_builtin(table, c) or c in own_live))]
    for chain in chain_order(table, looked_at):
        wanted = planned.get(chain, [])
        diffs = compare_chain(wanted, _ours(table, chain, live.get(chain, []), wanted))
        found += [d._replace(table=table, chain=chain) for d in diffs]
    return found


def compare_rules(planned: Chains, live: Chains) -> list[Difference]:
    """The differences between one family's planned and live chains, in one flavour."""
    found: list[Difference] = []
    for table in dict.fromkeys([*planned, *live]):
        found += _compare_table(table, planned.get(table, {}), live.get(table))
    return found


def _routing_text(routing: Routing) -> str:
    """The `ip` command line that shows it: `ip rule fwmark 0x539 lookup 133`, `ip -6 route local ::/0 ...`."""
    text = str(routing)
    return text if routing.family == 4 else text.replace("ip ", "ip -6 ", 1).replace(" default ", " ::/0 ")


def compare(planned: Planned, live: Live, flavour: str) -> Report:
    """Everything that differs, in a stable order: rules per flavour and family, then routing, addresses.

    Rules of istio-init in the other flavour, or in a family the plan has no
    rules for, are extra: the kernel runs both flavours' hooks.
    """
    found: list[Difference] = []
    for name in (flavour, *(f for f in FLAVOURS if f != flavour)):
        families = live.rules.get(name, {})
        for family in (4, 6):
            wanted = planned.rules.get(family, {}) if name == flavour else {}
            if not wanted and family not in families:
                continue
            diffs = compare_rules(wanted, families.get(family, {}))
            found += [d._replace(flavour=name, family=family) for d in diffs]
    found += [Difference("missing", "routing", _routing_text(r), family=r.family)
              for r in sorted(planned.routing - live.routing)]
    found += [Difference("extra", "routing", _routing_text(r), family=r.family)
              for r in sorted(live.routing - planned.routing)]
    found += [Difference("missing", "address", f"{a} on lo") for a in sorted(planned.addresses - live.addresses)]
    found += [Difference("extra", "address", f"{a} on lo") for a in sorted(live.addresses - planned.addresses)]
    return Report(flavour, tuple(found), planned)


# --------------------------------------------------------------------------- native nftables
# The plan's transaction is loaded into a scratch network namespace and read
# back as JSON (backends/nftables.py `as_loaded`), and so are the live tables,
# so both sides are in the kernel's canonical form and no rule text is parsed.
# A rule is compared by its expressions (counters and handles aside), with the
# same missing / extra / misordered logic as for iptables (compare_chain).

NftChains = dict[str, dict[str, list[str]]]  # table -> chain -> each rule's expressions as compact JSON


def chains_from_objects(objects: list[dict[str, Any]]) -> NftChains:
    """Our tables' chains and rules from `nft -j list ruleset` objects."""
    import json  # here and in to_json: json imports `re`, a cost of every `check` probe otherwise

    chains: NftChains = {}
    for obj in objects:
        if "chain" in obj:
            body = obj["chain"]
            chains.setdefault(body["table"], {}).setdefault(body["name"], [])
        elif "rule" in obj:
            body = obj["rule"]
            expr = [e for e in body.get("expr", []) if "counter" not in e]
            chains.setdefault(body["table"], {}).setdefault(body["chain"], []).append(
                json.dumps(expr, separators=(",", ":"), sort_keys=True))
    return chains


def _nft_value(value: Any) -> str:
    if isinstance(value, dict) and "prefix" in value:
        return f"{value['prefix']['addr']}/{value['prefix']['len']}"
    if isinstance(value, dict) and "set" in value:
        return "{ " + ", ".join(_nft_value(item) for item in value["set"]) + " }"
    if isinstance(value, dict) and "range" in value:
        return "-".join(_nft_value(item) for item in value["range"])
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("meta", "ct"):
        (kind, body), = value.items()
        return f"{kind} {body['key']}"
    if isinstance(value, list):
        return ",".join(_nft_value(item) for item in value)
    return str(value)


_NFT_QUOTED = ("iifname", "oifname")  # nft prints interface names as strings


def _nft_expression(expr: dict[str, Any]) -> str:
    """One libnftables JSON expression in nft's own syntax; an unknown one stays JSON."""
    import json  # only for nft drift (see chains_from_objects)

    (kind, body), = expr.items()
    if kind == "match":
        left, right, op = body["left"], body["right"], body["op"]
        if "payload" in left:
            subject = f"{left['payload']['protocol']} {left['payload']['field']}"
        elif "meta" in left:
            key = left["meta"]["key"]
            subject = key if key in _NFT_QUOTED else f"meta {key}"
        elif "ct" in left:
            subject = f"ct {left['ct']['key']}"
        else:
            return json.dumps(expr, separators=(",", ":"))
        quoted = isinstance(left.get("meta"), dict) and left["meta"]["key"] in _NFT_QUOTED
        shown = json.dumps(right) if quoted and isinstance(right, str) else _nft_value(right)
        return f"{subject} {'' if op in ('==', 'in') else op + ' '}{shown}"
    if kind in ("return", "accept", "drop"):
        return kind
    if kind in ("jump", "goto"):
        return f"{kind} {body['target']}"
    if kind == "counter":
        return "counter"
    if kind == "redirect":
        return f"redirect to :{body['port']}" if "port" in body else "redirect"
    if kind in ("dnat", "snat"):
        family = f" {body['family']}" if "family" in body else ""
        port = f":{body['port']}" if "port" in body else ""
        return f"{kind}{family} to {body.get('addr', '')}{port}"
    if kind == "tproxy":
        family = f" {body['family']}" if "family" in body else ""
        return f"tproxy{family} to {body.get('addr', '')}:{body['port']}"
    if kind == "mangle":
        return f"{_nft_value(body['key'])} set {_nft_value(body['value'])}"
    return json.dumps(expr, separators=(",", ":"))


def nft_rule_text(expressions: str) -> str:
    """A rule compared as compact JSON (chains_from_objects), shown as `nft list` would write it."""
    import json

    return " ".join(_nft_expression(expr) for expr in json.loads(expressions))


def compare_nft(planned: NftChains, live: NftChains) -> list[Difference]:
    """Every difference between our planned and live nft chains (the tables are all ours).

    Rules are compared as JSON and reported in nft's syntax, as `nft list ruleset` shows them.
    """
    found: list[Difference] = []
    for table in dict.fromkeys([*planned, *live]):
        want, have = planned.get(table, {}), live.get(table, {})
        found += [Difference("missing", "chain", c, flavour="nftables", table=table, chain=c)
                  for c in want if c not in have]
        found += [Difference("extra", "chain", c, flavour="nftables", table=table, chain=c)
                  for c in have if c not in want]
        for chain in dict.fromkeys([*want, *have]):
            diffs = compare_chain(want.get(chain, []), list(enumerate(have.get(chain, []), 1)))
            found += [d._replace(flavour="nftables", table=table, chain=chain, text=nft_rule_text(d.text))
                      for d in diffs]
    return found


# --------------------------------------------------------------------------- output


def _summary(report: Report) -> str:
    parts = []
    if report.flavour == "nftables":
        parts.append("native nftables: the inet istio-proxy-* tables as the flags' transaction loads them")
    for family, chains in sorted(report.planned.rules.items() if report.flavour != "nftables" else ()):
        rules = sum(len(specs) for by_chain in chains.values() for specs in by_chain.values())
        count = sum(1 for table, by_chain in chains.items() for c in by_chain if is_own_chain(table, c))
        tool = command(family, f"-{report.flavour}")
        parts.append(f"{tool}: {rules} rules in {count} chains")
    if report.planned.routing:
        parts.append("TPROXY policy rule and route")
    parts += [f"{address} on lo" for address in sorted(report.planned.addresses)]
    return "; ".join(parts)


def format_text(report: Report) -> str:
    """One line when in sync; else a count line and one line per difference."""
    if report.in_sync:
        return f"istio-init check: in sync ({_summary(report)})"
    counts = {kind: sum(1 for d in report.differences if d.kind == kind) for kind in ("missing", "extra", "misordered")}
    lines = [f"istio-init check: out of sync with the flags: {counts['missing']} missing, {counts['extra']} extra, "
             f"{counts['misordered']} misordered (expected: {_summary(report)})"]
    lines += [d.line() for d in report.differences]
    if report.hint:
        lines.append(report.hint)
    return "\n".join(lines)


def to_json(report: Report) -> str:
    import json

    return json.dumps({
        "in_sync": report.in_sync,
        "flavour": report.flavour,
        "expected": _summary(report),
        "differences": [d._asdict() for d in report.differences],
        **({"hint": report.hint} if report.hint else {}),
    }, indent=2)


# --------------------------------------------------------------------------- the kernel


def start_reading(backend: str) -> installed.Reading:
    """installed.Reading started: the save tools run while the caller plans (CheckError when one cannot start)."""
    from istio_init import installed
    from istio_init.errors import ApplyError

    try:
        return installed.Reading(backend)
    except ApplyError as exc:
        raise CheckError(f"cannot read the rules: {exc}") from None


def read_rules(backend: str, reading: installed.Reading | None = None) -> tuple[str, dict[str, dict[int, Chains]]]:
    """(the store holding istio-init's rules, the rules of every flavour in use: flavour -> family -> chains).

    Read through installed.py, the one reader `trace --live` and `graph
    --live` use too, so all three judge the same store; `reading`: one started already.
    """
    from istio_init.errors import ApplyError

    try:
        found = (reading or start_reading(backend)).finish()
    except ApplyError as exc:
        raise CheckError(f"cannot read the rules: {exc}") from None
    return found.store, {name: {family: chains_from_tables(tables) for family, tables in families.items()}
                         for name, families in found.tables.items()}


def read_state(backend: str, planned: Planned, tproxy: tuple[int, int] = (1337, 133),
               reading: installed.Reading | None = None) -> Live:
    """The rules (read_rules), istio-init's policy routing and `::6` on lo.

    istio-init's policy routing is that of the planned marks and tables, of
    the flags' TPROXY mark and route table (`tproxy`) and of marks set by live
    ISTIO_DIVERT rules (any flavour and family), in the shapes a rule set
    plans (host/routing.py), so a stale TPROXY route is extra and a user's rule is
    never looked at.
    """
    from istio_init import installed
    from istio_init.iptables_save.read import DIVERT_CHAIN, divert_marks
    from istio_init.model import IPV6_PASSTHROUGH_ADDRESS

    store, rules = read_rules(backend, reading)
    marks = {r.fwmark for r in planned.routing if r.kind == "rule"} | {tproxy[0]}
    marks |= {m for families in rules.values() for chains in families.values()
              for m in divert_marks(chains.get("mangle", {}).get(DIVERT_CHAIN, []))}
    tables = {r.table for r in planned.routing} | {tproxy[1]}
    try:
        routing = installed.policy_routing(marks, tables)
        on_lo = installed.loopback_ipv6()
    except Exception as exc:  # OSError: netlink's refusal
        raise CheckError(f"cannot read the policy routing or the addresses on lo: {exc}") from None
    addresses = {a for a in {IPV6_PASSTHROUGH_ADDRESS, *planned.addresses} if a in on_lo}
    return Live(rules, frozenset(routing), frozenset(addresses), store)


def _apply_lock() -> ContextManager[None]:
    """istio-init's lock of this namespace, waited for briefly; none when no apply ever made it.

    An apply creates the lock file before it takes the lock, so without the
    file there is nothing to wait for, and check creates nothing (a probe
    container's root file system is often read-only).
    """
    import os

    from istio_init.host import locks

    if not os.path.exists(locks.namespace_lock_path()):
        import contextlib  # only here: contextlib is start-up time of every probe (docs/performance.md)

        return contextlib.nullcontext()
    return locks.namespace_lock(LOCK_WAIT_SECONDS)


def compare_installed(config: Config, log: Log) -> Report:
    """`istio-init check` in the current namespace: plan for the flags, read the state, compare.

    Holds istio-init's lock only while reading, and waits for it only a few
    seconds, so a half-finished apply (in the same container) is not reported
    as drift and a probe never holds up an apply.
    """
    from istio_init import runner, timing

    if config.native_nftables:
        rule_plan, _ = runner.build_plan(config, log)
        return _run_native(config, rule_plan, planned_state(rule_plan))
    planned: Planned | None = None
    planning = False
    try:
        with _apply_lock():
            timing.mark("istio-init's namespace lock")
            # The save tools run while the plan is made: their start is most of what a check waits for.
            reading = start_reading(config.iptables_backend)
            timing.mark("start the save tools")
            planning = True
            try:
                rule_plan, _ = runner.build_plan(config, log)
                planned = planned_state(rule_plan)
                timing.mark("the planned state")
            finally:
                if planned is None:
                    reading.abandon()
            live = read_state(config.iptables_backend, planned, (config.tproxy_mark, config.tproxy_route_table),
                              reading)
            timing.mark("read the live state")
    except CheckError:
        raise
    except IstioInitError as exc:
        if planning and planned is None:
            raise  # planning failed: that is not a read
        raise CheckError(str(exc)) from None
    report = compare(planned, live, live.store)
    timing.mark("compare")
    if not report.in_sync and _native_tables_here():
        report = report._replace(hint=NATIVE_HINT)
    return report


NATIVE_HINT = ("hint: this namespace holds istio-init's native nftables tables (inet istio-proxy-*): "
               "the rules were applied with --native-nftables; check them with --native-nftables")


def _native_tables_here() -> bool:
    from istio_init import backends

    try:
        return backends.native_nft_in_use()
    except Exception:  # a hint only: never the reason a check fails
        return False


def _run_native(config: Config, rule_plan: RulePlan, planned: Planned) -> Report:
    """--native-nftables: our nft tables against the plan's; istio-init's iptables rules, if any, are extra."""
    from istio_init import installed
    from istio_init.backends.nftables import NftablesBackend, guard_single_family
    from istio_init.nft.write import render_transaction

    try:
        backend = NftablesBackend(guard_single_family(config.rules_version))
        want = chains_from_objects(backend.as_loaded(render_transaction(rule_plan, backend.guard_single_family)))
        with _apply_lock():
            have = chains_from_objects(installed.native_objects())
            live = read_state("auto", planned, (config.tproxy_mark, config.tproxy_route_table))
    except CheckError:
        raise
    except IstioInitError as exc:
        raise CheckError(str(exc)) from None
    others = compare(planned._replace(rules={}), live, "nftables")  # iptables rules of ours: extra; routes
    return Report("nftables", (*compare_nft(want, have), *others.differences), planned)
