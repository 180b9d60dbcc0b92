"""`istio-init trace`: what the rules will do with one connection, rule by rule.

The question people ask of a sidecar's rules is never "what is in the nat
table" but "why did (or didn't) this connection reach the proxy". This module
answers it by walking the rules the way netfilter does for the first packet
of a connection:

- outbound (locally generated): raw OUTPUT, mangle OUTPUT, nat OUTPUT, then
  nat POSTROUTING with the destination after any DNAT/REDIRECT;
- inbound: raw PREROUTING, mangle PREROUTING, then nat PREROUTING.

Jumps push a chain, RETURN and the end of a user chain pop it, the end of a
built-in chain is its ACCEPT policy. Conntrack state is assumed NEW (it is the
first packet), its source port an ephemeral one no rule names, and its
packet and connection marks start at 0 and follow the MARK and CONNMARK rules
it passes (current Istio's TPROXY rules test them); CT (a conntrack zone for
DNS) does not end the walk. REDIRECT, DNAT and TPROXY are "captured"; anything else that
ends the walk is "not captured", blamed on the last rule that matched (the
RETURN that let the connection go), so the answer names the rule to look at.

Everything here is pure except `read_live` and `read_live_native`, which read
what is installed in the current namespace (through installed.py) for
`--live`. The rules come either from the planner (what these flags would
install) or from installed rules parsed back into `model.Rule` by the dialect
readers (`iptables_save.read`, `nft.read`), which refuse rule text they cannot
evaluate rather than guess.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

from istio_init.errors import TraceError
from istio_init.iptables_save.read import SavedTable, UnmodelledRule, parse_save
from istio_init.iptables_save.read import parse_rule as parse_saved_rule
from istio_init.iptables_save.write import rule_spec
from istio_init.model import BUILTIN_CHAINS, FamilyPlan, Match, Rule, is_builtin

if TYPE_CHECKING:
    from istio_init.config import Config

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
# table -> chain -> rules in kernel order
Ruleset = Mapping[str, Mapping[str, list[Rule]]]

INBOUND = "in"
OUTBOUND = "out"
CAPTURING_TARGETS = ("REDIRECT", "DNAT", "TPROXY")
# Targets that end a table's walk without capturing.
_FINAL_TARGETS = ("ACCEPT", "DROP", "REJECT", "SNAT", "MASQUERADE")
_MAX_STEPS = 10000  # a loop in live rules must not hang the tool


@dataclass(frozen=True)
class Connection:
    """The first packet of a connection, as netfilter sees it."""

    direction: str  # INBOUND or OUTBOUND
    dst: IPAddress
    dport: int
    protocol: str = "tcp"
    src: IPAddress | None = None  # None: an address no rule names (the pod's own)
    uid: int = 0
    gid: int = 0
    in_interface: str | None = None
    out_interface: str | None = None

    @property
    def family(self) -> int:
        return self.dst.version


def _address(flag: str, value: str) -> IPAddress:
    """`value` as an address; a user's typo is a usage error naming the flag, as for every other flag."""
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise TraceError(f"invalid value for {flag}: {value!r}: not an IPv4 or IPv6 address") from None


def make_connection(direction: str, dst: str, dport: int, protocol: str = "tcp", src: str | None = None,
                    uid: int = 0, gid: int = 0, in_interface: str | None = None,
                    out_interface: str | None = None,
                    local_addresses: Iterable[IPAddress] = ()) -> Connection:
    """A Connection with the interfaces and source the kernel would pick.

    Outbound traffic leaves by `lo` when the destination is local (loopback, or
    one of `local_addresses`), else by `eth0`; a loopback destination gets the
    loopback source the kernel would choose. Inbound traffic arrives on `eth0`.
    """
    if direction not in (INBOUND, OUTBOUND):
        raise TraceError(f"--direction must be '{INBOUND}' or '{OUTBOUND}', not {direction!r}")
    if protocol not in ("tcp", "udp"):
        raise TraceError(f"--protocol must be tcp or udp, not {protocol!r}")
    dst_ip = _address("--dst", dst)
    src_ip = _address("--src", src) if src else None
    if src_ip is not None and src_ip.version != dst_ip.version:
        raise TraceError(f"--src {src_ip} and --dst {dst_ip} are of different IP families")
    if not 0 <= dport <= 65535:
        raise TraceError(f"--dport {dport} is not a port")
    local = dst_ip.is_loopback or dst_ip in set(local_addresses) or dst_ip == ipaddress.ip_address("::6")
    if direction == OUTBOUND:
        out_interface = out_interface or ("lo" if local else "eth0")
        if src_ip is None and dst_ip.is_loopback:
            src_ip = ipaddress.ip_address("127.0.0.1" if dst_ip.version == 4 else "::1")
    else:
        in_interface = in_interface or "eth0"
    return Connection(direction, dst_ip, dport, protocol, src_ip, uid, gid, in_interface, out_interface)


@dataclass(frozen=True)
class Hit:
    """One rule that matched: where it is (1-based) and what it did."""

    table: str
    hook: str  # the built-in chain the walk started from
    chain: str
    number: int
    rule: str
    target: str
    depth: int  # 0 in the built-in chain, +1 per jump


@dataclass(frozen=True)
class Verdict:
    """The outcome for one connection, and the rules that led to it."""

    captured: bool
    outcome: str  # one line, e.g. "captured: REDIRECT to 15001"
    target: str | None = None  # the deciding target (REDIRECT, RETURN, ...)
    to_port: int | None = None
    to_address: str | None = None
    decided_by: Hit | None = None
    hits: tuple[Hit, ...] = ()
    tables: tuple[str, ...] = ()  # "table CHAIN" hooks walked, in order

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- live rules -> Rule


def parse_rule(table: str, chain: str, spec: str) -> Rule:
    """Canonical iptables-save rule text as a model.Rule, or TraceError naming the rule."""
    try:
        return parse_saved_rule(table, chain, spec)
    except UnmodelledRule as exc:
        raise TraceError(f"cannot evaluate {table} {chain} rule '{spec}': {exc}") from None


def ruleset_from_tables(tables: Mapping[str, SavedTable]) -> dict[str, dict[str, list[Rule]]]:
    """The rules of parsed live tables, per table and chain, in kernel order."""
    ruleset: dict[str, dict[str, list[Rule]]] = {}
    for name, table in tables.items():
        chains = ruleset.setdefault(name, {})
        for chain in table.chains:
            chains.setdefault(chain, [])
        for saved in table.rules:
            if saved.rule is None:
                raise TraceError(f"cannot evaluate {name} {saved.chain} rule '{saved.spec}': {saved.problem}")
            chains.setdefault(saved.chain, []).append(saved.rule)
    return ruleset


def ruleset_from_save(text: str) -> dict[str, dict[str, list[Rule]]]:
    """The rules of iptables-save text, per table and chain, in kernel order."""
    return ruleset_from_tables(parse_save(text))


def ruleset_from_plan(family: FamilyPlan) -> dict[str, dict[str, list[Rule]]]:
    return {table: family.final_rules(table) for table in family.tables()}


def read_live(family: int, backend: str = "auto") -> tuple[dict[str, dict[str, list[Rule]]], str]:
    """The rules of the store holding istio-init's (installed.py, as `check` and `graph` read them).

    Returns (ruleset, the save tool that shows them).
    """
    from istio_init import installed
    from istio_init.backends.iptables.tools import command
    from istio_init.errors import ApplyError

    try:
        found = installed.read(backend)
    except ApplyError as exc:
        raise TraceError(str(exc)) from None
    tool = command(family, f"-{found.store}-save")
    return ruleset_from_tables(found.of_store(family)), tool


def read_live_native(family: int) -> tuple[dict[str, dict[str, list[Rule]]], str]:
    """`family`'s rules of istio-init's native nftables tables (installed.py reads them) and where they came from."""
    from istio_init import installed
    from istio_init.errors import ApplyError
    from istio_init.nft.read import ruleset_from_json

    try:
        objects = installed.native_objects()
    except ApplyError as exc:
        raise TraceError(str(exc)) from None
    return ruleset_from_json(objects, family), "nft -j list ruleset"


# --------------------------------------------------------------------------- matching


def _in_cidr(address: IPAddress | None, cidr: str) -> bool:
    if address is None:
        return False
    network = ipaddress.ip_network(cidr, strict=False)
    return network.version == address.version and address in network


def _iface_matches(pattern: str, name: str | None) -> bool:
    if name is None:
        return False
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return name == pattern


def _port_in(spec: str, port: int) -> bool:
    """`80`, `1000:2000`, or a multiport list `80,443,9000:9010`."""
    for item in spec.split(","):
        low, colon, high = item.partition(":")
        first = int(low) if low else 0
        last = (int(high) if high else 65535) if colon else first
        if first <= port <= last:
            return True
    return False


def _id_in(spec: str, ident: int) -> bool:
    low, _, high = spec.partition("-")
    return int(low) <= ident <= int(high or low)


def _mark_matches(spec: str, mark: int) -> bool:
    """`--mark VALUE[/MASK]` against a mark."""
    value, _, mask = spec.partition("/")
    bits = int(mask, 0) if mask else 0xFFFFFFFF
    return mark & bits == int(value, 0) & bits


def _match_module(match: Match, conn: Connection, hook: str, where: str, marks: tuple[int, int] = (0, 0)) -> bool:
    for opt in match.options:
        if match.module in ("tcp", "udp") and opt.name in ("dport", "destination-port"):
            ok = match.module == conn.protocol and _port_in(opt.value, conn.dport)
        elif match.module in ("tcp", "udp") and opt.name in ("sport", "source-port"):
            ok = False  # an ephemeral source port: never one a rule names
        elif match.module in ("mark", "connmark") and opt.name == "mark":
            ok = _mark_matches(opt.value, marks[0] if match.module == "mark" else marks[1])
        elif match.module == "multiport" and opt.name in ("dports", "destination-ports"):
            ok = conn.protocol in ("tcp", "udp") and _port_in(opt.value, conn.dport)
        elif match.module == "owner" and opt.name in ("uid-owner", "gid-owner"):
            if hook not in ("OUTPUT", "POSTROUTING"):
                raise TraceError(f"{where}: owner match outside OUTPUT/POSTROUTING")
            ok = _id_in(opt.value, conn.uid if opt.name == "uid-owner" else conn.gid)
        elif match.module in ("conntrack", "state") and opt.name in ("ctstate", "state"):
            ok = "NEW" in opt.value.split(",")  # the first packet of a connection
        else:
            raise TraceError(f"{where}: cannot evaluate -m {match.module} --{opt.name}")
        if ok == opt.negated:
            return False
    return True


def rule_matches(rule: Rule, conn: Connection, hook: str, where: str = "", marks: tuple[int, int] = (0, 0)) -> bool:
    """Does `rule` match the first packet of `conn` in built-in chain `hook`? `marks`: (packet, connection)."""
    where = where or f"{rule.table} {rule.chain} rule '{rule_spec(rule)}'"
    if rule.protocol and rule.protocol not in (conn.protocol, "all"):
        return False
    if rule.source and not _in_cidr(conn.src, rule.source):
        return False
    if rule.destination and _in_cidr(conn.dst, rule.destination) == rule.negate_destination:
        return False
    if rule.in_interface and not _iface_matches(rule.in_interface, conn.in_interface):
        return False
    if rule.out_interface and not _iface_matches(rule.out_interface, conn.out_interface):
        return False
    return all(_match_module(match, conn, hook, where, marks) for match in rule.matches)


# --------------------------------------------------------------------------- walking


@dataclass
class _Walk:
    """The state of one table walk: hits so far, and the deciding target if any."""

    hits: list[Hit] = field(default_factory=list)
    final: Hit | None = None
    last: Hit | None = None
    marks: tuple[int, int] = (0, 0)  # the packet's and its connection's mark after the walk


def _option(rule: Rule, name: str) -> str | None:
    for opt in rule.target_options:
        if opt.name == name:
            return opt.value
    return None


def _set_marks(rule: Rule, marks: tuple[int, int]) -> tuple[int, int]:
    """The (packet, connection) marks after a MARK or CONNMARK rule."""
    mark, connmark = marks
    for opt in rule.target_options:
        value, _, mask = opt.value.partition("/")
        bits = int(mask, 0) if mask else 0xFFFFFFFF
        if opt.name == "set-xmark":
            mark = (mark & ~bits & 0xFFFFFFFF) ^ int(value, 0)
        elif opt.name == "set-mark":
            mark = (mark & ~bits & 0xFFFFFFFF) | int(value, 0)
        elif opt.name == "save-mark":
            connmark = mark
        elif opt.name == "restore-mark":
            mark = connmark
    return mark, connmark


def walk_table(ruleset: Ruleset, table: str, hook: str, conn: Connection, marks: tuple[int, int] = (0, 0)) -> _Walk:
    """Walk built-in chain `hook` of `table` (and its jumps) for `conn`, starting with `marks`."""
    walk = _Walk(marks=marks)
    chains = ruleset.get(table, {})
    stack: list[tuple[str, int]] = [(hook, 0)]
    steps = 0
    while stack:
        chain, position = stack.pop()
        rules = chains.get(chain, [])
        descended = False
        while position < len(rules):
            steps += 1
            if steps > _MAX_STEPS:
                raise TraceError(f"{table}: more than {_MAX_STEPS} rule evaluations; is there a jump loop?")
            rule = rules[position]
            position += 1
            where = f"{table} {chain} rule {position} '{rule_spec(rule)}'"
            if not rule_matches(rule, conn, hook, where, walk.marks):
                continue
            hit = Hit(table, hook, chain, position, rule_spec(rule), rule.target, len(stack))
            walk.hits.append(hit)
            walk.last = hit
            if rule.target == "RETURN":
                break  # back to the caller (a built-in chain: its policy)
            if rule.target in CAPTURING_TARGETS or rule.target in _FINAL_TARGETS:
                walk.final = hit
                return walk
            if rule.target in ("MARK", "CONNMARK"):
                walk.marks = _set_marks(rule, walk.marks)
                continue
            if rule.target in ("LOG", "NFLOG", "CT"):
                continue  # non-terminating
            if rule.target in chains or (rule.target.isupper() and rule.target.startswith("ISTIO_")):
                if len(stack) > 64:
                    raise TraceError(f"{where}: jumps nested deeper than 64 chains")
                stack.append((chain, position))
                stack.append((rule.target, 0))
                descended = True
                break
            raise TraceError(f"{where}: cannot evaluate target {rule.target}")
        if descended:
            continue
        if is_builtin(table, chain) and chain == hook:
            break  # end (or RETURN) of the built-in chain: its policy decides
    return walk


def _redirect_address(conn: Connection) -> str:
    """REDIRECT sends locally generated packets to loopback, inbound ones to the interface address."""
    if conn.direction == OUTBOUND:
        return "127.0.0.1" if conn.family == 4 else "::1"
    return "(address of the incoming interface)"


def _capture(hit: Hit, rule: Rule, conn: Connection) -> tuple[int | None, str | None, str]:
    if rule.target == "REDIRECT":
        ports = _option(rule, "to-ports") or str(conn.dport)
        return int(ports.split("-")[0]), _redirect_address(conn), f"REDIRECT to {ports}"
    if rule.target == "TPROXY":
        port = _option(rule, "on-port") or str(conn.dport)
        return int(port), str(conn.dst), f"TPROXY to {port}"
    target = _option(rule, "to-destination") or ""
    host, _, port = target.rpartition(":")
    if not host:  # address only
        host, port = target, str(conn.dport)
    host = host.strip("[]")
    return int(port), host, f"DNAT to {target}"


def _hooks(conn: Connection) -> list[tuple[str, str]]:
    if conn.direction == OUTBOUND:
        return [("raw", "OUTPUT"), ("mangle", "OUTPUT"), ("nat", "OUTPUT"), ("nat", "POSTROUTING")]
    return [("raw", "PREROUTING"), ("mangle", "PREROUTING"), ("nat", "PREROUTING")]


def trace(ruleset: Ruleset, conn: Connection) -> Verdict:
    """What the rules in `ruleset` (one IP family) do with the first packet of `conn`."""
    hits: list[Hit] = []
    walked: list[str] = []
    captured: tuple[Hit, Rule] | None = None
    blamed: Hit | None = None
    current = conn
    marks = (0, 0)
    for table, hook in _hooks(conn):
        if hook not in BUILTIN_CHAINS[table] or (table == "raw" and not any(ruleset.get(table, {}).values())):
            continue  # the raw table only when it holds rules (current Istio's DNS zones)
        walked.append(f"{table} {hook}")
        walk = walk_table(ruleset, table, hook, current, marks)
        marks = walk.marks
        hits += walk.hits
        if walk.final is not None and walk.final.target in CAPTURING_TARGETS and captured is None:
            rule = ruleset[table][walk.final.chain][walk.final.number - 1]
            captured = (walk.final, rule)
            port, address, _ = _capture(walk.final, rule, current)
            if address and not address.startswith("("):
                # Later hooks see the translated destination (POSTROUTING's SNAT for DNS).
                current = Connection(current.direction, ipaddress.ip_address(address), port or current.dport,
                                     current.protocol, current.src, current.uid, current.gid,
                                     current.in_interface, current.out_interface)
        elif table == "nat" and hook != "POSTROUTING" and captured is None:
            blamed = walk.final or walk.last
    if captured is not None:
        hit, rule = captured
        port, address, what = _capture(hit, rule, conn)
        return Verdict(True, f"captured: {what}", hit.target, port, address, hit, tuple(hits), tuple(walked))
    if blamed is None:
        main = "nat OUTPUT" if conn.direction == OUTBOUND else "nat PREROUTING"
        return Verdict(False, f"not captured: no rule matched in {main}", None, None, None, None,
                       tuple(hits), tuple(walked))
    if blamed.target == "RETURN" or blamed.target in _FINAL_TARGETS:
        outcome = f"not captured: {blamed.target} at {blamed.chain} rule {blamed.number} ({blamed.rule})"
    else:
        outcome = (f"not captured: no rule matched in {blamed.target} "
                   f"(entered from {blamed.chain} rule {blamed.number})")
    return Verdict(False, outcome, blamed.target, None, None, blamed, tuple(hits), tuple(walked))


def format_verdict(conn: Connection, verdict: Verdict, source: str) -> str:
    """The human-readable trace: the connection, each matching rule indented by depth, the outcome."""
    who = f"uid {conn.uid} gid {conn.gid}, " if conn.direction == OUTBOUND else ""
    iface = f"out {conn.out_interface}" if conn.direction == OUTBOUND else f"in {conn.in_interface}"
    src = conn.src if conn.src is not None else "(pod address)" if conn.direction == OUTBOUND else "(remote)"
    dst = f"[{conn.dst}]" if conn.family == 6 else str(conn.dst)
    lines = [f"connection: {conn.direction} {conn.protocol} {src} -> {dst}:{conn.dport} ({who}{iface})",
             f"rules: {source}"]
    for hook in verdict.tables:
        table, chain = hook.split()
        lines.append(f"{table} {chain}:")
        hook_hits = [h for h in verdict.hits if h.table == table and h.hook == chain]
        if not hook_hits:
            lines.append("  (no rule matched; policy ACCEPT)")
        for h in hook_hits:
            lines.append(f"  {'  ' * h.depth}{h.chain} rule {h.number}: {h.rule}")
    lines.append(verdict.outcome)
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def trace_connection(config: Config, conn_args: dict[str, Any], live: bool, as_json: bool, resolvers: Sequence[str] = ()) -> str:
    """`istio-init trace`: the rules for `config` (or the live ones) applied to one connection.

    `resolvers` are the pod's nameservers, which the current rule set's plan captures DNS to.
    """
    import json

    from istio_init.rulesets import plan
    from istio_init.system import current

    local: list[IPAddress] = []
    if live:
        try:
            local = list(current().pod_addresses())
        except OSError:
            local = []
    conn = make_connection(local_addresses=local, **conn_args)
    if live and config.native_nftables:
        ruleset, source = read_live_native(conn.family)
        source = f"live ({source})"
    elif live:
        ruleset, source = read_live(conn.family, config.iptables_backend)
        source = f"live ({source})"
    else:
        ipv6 = conn.family == 6 if config.ipv6 is None else config.ipv6
        planned = plan(config, ipv6, resolvers)
        family_plan = planned.ipv6 if conn.family == 6 else planned.ipv4
        ruleset = ruleset_from_plan(family_plan) if family_plan is not None else {}
        source = "plan for the given flags" + ("" if family_plan is not None else " (no IPv6 rules: --ipv6 false)")
    verdict = trace(ruleset, conn)
    if as_json:
        data = {"connection": {k: (str(v) if isinstance(v, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else v)
                               for k, v in asdict(conn).items()},
                "rules": source, **verdict.to_json()}
        return json.dumps(data, indent=2)
    return format_verdict(conn, verdict, source)
