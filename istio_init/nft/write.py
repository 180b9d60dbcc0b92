"""A plan as one native nftables transaction (`nft -f` text), for `--native-nftables`.

Pure: the same text is the dry run's output and what the nftables backend
loads, so a dry run shows exactly what an apply sends. The plan speaks
iptables (tables, built-in chains, `-m` matches, targets); this module maps
each rule onto nft expressions in family `inet`, where one table serves IPv4
and IPv6 at once:

- Tables `inet istio-proxy-nat|mangle|raw`; the built-in chains become base
  chains at iptables' priorities (nat -100/100, mangle -150, raw -300), the
  ISTIO_ chains regular chains named in lower case with `-`.
- The two families' rules of a chain are merged into one list: a rule that
  reads the same in both is written once, a rule whose addresses differ is
  written for `ip` then `ip6` next to its twin, and a rule only one family has
  is guarded with `meta nfproto` unless it is a jump into a chain that holds
  nothing for the other family (then it is a no-op there, as Istio writes it).
  Inserts go at the same index in the merged chain, as Istio's `insert rule
  ... index N` does; within each family the order is that of its plan.
- Expressions are written in the order Istio's nft rule set writes them
  (interface, protocol, addresses, matches; in raw the port and owner before
  the address; a conntrack state before a port), because `nft list` keeps the
  order it was given and the goldens are compared listing to listing.

read.py maps the kernel's JSON listing of these tables back onto the plan's
rules, so the two change together (tests/test_nft_roundtrip.py).

The transaction first does `add table` + `delete table` for each of our
tables (idempotent whether or not the table exists), then adds the new
content: one kernel transaction, no moment without capture rules, nothing
outside our tables touched.
"""

from __future__ import annotations

import difflib
from typing import Iterable, NamedTuple

from istio_init.model import (INSERT, IPV4_PASSTHROUGH_ADDRESS, IPV6_PASSTHROUGH_ADDRESS, NATIVE_TABLE_PREFIX,
                              NATIVE_TABLES, Match, Option, Rule, RulePlan, Step)

FAMILY = "inet"
TABLE_PREFIX = NATIVE_TABLE_PREFIX
TABLES = NATIVE_TABLES  # the order Istio creates (and `nft list` shows) them

# (iptables table, built-in chain) -> (nft chain type, priority).
BASE_CHAINS = {
    ("nat", "PREROUTING"): ("nat", -100),
    ("nat", "INPUT"): ("nat", 100),
    ("nat", "OUTPUT"): ("nat", -100),
    ("nat", "POSTROUTING"): ("nat", 100),
    ("mangle", "PREROUTING"): ("filter", -150),
    ("mangle", "INPUT"): ("filter", -150),
    ("mangle", "FORWARD"): ("filter", -150),
    ("mangle", "OUTPUT"): ("route", -150),  # re-routes when the mark changes, as iptables' mangle OUTPUT
    ("mangle", "POSTROUTING"): ("filter", -150),
    ("raw", "PREROUTING"): ("filter", -300),
    ("raw", "OUTPUT"): ("filter", -300),
}
HOOK_ORDER = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
# Istio's creation order of its regular chains (the listing order); others follow by first use.
CHAIN_ORDER = ("ISTIO_DIVERT", "ISTIO_TPROXY", "ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT",
               "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS", "ISTIO_DROP")

_VERDICTS = {"RETURN": "return", "ACCEPT": "accept", "DROP": "drop"}
_FULL_MASK = 0xFFFFFFFF
_NFPROTO = {4: "meta nfproto ipv4", 6: "meta nfproto ipv6"}


class NftRenderError(ValueError):
    """A rule uses a match or target this module has no nft form for (a planner bug)."""


def table_name(table: str) -> str:
    return TABLE_PREFIX + table


def chain_name(chain: str) -> str:
    return chain.lower().replace("_", "-")


class _Expr(NamedTuple):
    """One piece of a rule: its text, and its family-free spelling for pairing IPv4 with IPv6."""

    text: str
    key: str
    addressed: bool = False  # an ip/ip6 address match: the rule applies to that family only


class _Written(NamedTuple):
    """One rule in nft form for one family."""

    text: str
    key: str
    self_guarded: bool  # restricted to its family by an address match
    jump: str | None  # the chain it jumps to, if any


def _ip(family: int) -> str:
    return "ip6" if family == 6 else "ip"


def _role(address: str) -> str:
    """What an address is for, so that 127.0.0.1/32 pairs with ::1/128 and 127.0.0.6 with ::6."""
    if address in (IPV4_PASSTHROUGH_ADDRESS, IPV6_PASSTHROUGH_ADDRESS):
        return "SIX"
    if address.startswith("127.0.0.1/") or address == "::1/128":  # the loopback CIDR, whatever its mask
        return "LOOP"
    return "ADDR"


def _address(direction: str, address: str, negated: bool) -> _Expr:
    family = 6 if ":" in address else 4
    op = "!= " if negated else ""
    return _Expr(f"{_ip(family)} {direction} {op}{address}", f"{direction} {op}{_role(address)}", True)


def _interface(word: str, name: str) -> _Expr:
    """iptables' `eth+` (a prefix) is nft's `"eth*"`; a literal `*` at the end is escaped.

    Only a trailing `*` is a wildcard to nft (`a*b` is listed back as it is),
    and nft counts an escape in the name's 15 bytes: so nothing else is escaped.
    """
    text = name
    if text.endswith("*"):
        text = text[:-1] + "\\*"
    elif text.endswith("+"):
        text = text[:-1] + "*"
    return _Expr(f'{word} "{text}"', f'{word} "{text}"')


def _ports(value: str) -> str:
    """`a,b:c` -> `{ a, b-c }`, in order (as the kernel lists a set); a single port or range stays bare."""
    items = [item.replace(":", "-") for item in value.split(",")]
    if len(items) == 1:
        return items[0]
    return "{ " + ", ".join(sorted(items, key=lambda item: int(item.split("-")[0]))) + " }"


def _mark_match(left: str, option: Option) -> str:
    value, _, mask = option.value.partition("/")
    op = "!= " if option.negated else ""
    if mask and int(mask, 0) != _FULL_MASK:
        return f"{left} and {int(mask, 0):#x} {op or '== '}{int(value, 0):#x}"
    return f"{left} {op}{int(value, 0)}"


def _match(match: Match, protocol: str | None) -> list[_Expr]:
    out = []
    for opt in match.options:
        op = "!= " if opt.negated else ""
        if match.module in ("tcp", "udp") and opt.name in ("dport", "sport", "destination-port", "source-port"):
            field = "dport" if opt.name in ("dport", "destination-port") else "sport"
            text = f"{match.module} {field} {op}{_ports(opt.value)}"
        elif match.module == "multiport" and opt.name in ("dports", "sports", "destination-ports", "source-ports"):
            if protocol not in ("tcp", "udp"):
                raise NftRenderError(f"-m multiport needs -p tcp or -p udp, not {protocol!r}")
            field = "dport" if opt.name.startswith("d") else "sport"
            text = f"{protocol} {field} {op}{_ports(opt.value)}"
        elif match.module == "owner" and opt.name in ("uid-owner", "gid-owner"):
            text = f"meta sk{opt.name[0]}id {op}{opt.value}"
        elif match.module == "conntrack" and opt.name == "ctstate":
            text = f"ct state {op}{opt.value.lower()}"
        elif match.module == "mark" and opt.name == "mark":
            text = _mark_match("meta mark", opt)
        elif match.module == "connmark" and opt.name == "mark":
            text = _mark_match("ct mark", opt)
        else:
            raise NftRenderError(f"no nft form for -m {match.module} --{opt.name}")
        out.append(_Expr(text, text))
    return out


def _options(rule: Rule) -> dict[str, str]:
    return {opt.name: opt.value for opt in rule.target_options}


def _set_mark(value: str, xor: bool) -> str:
    """MARK --set-xmark V/M is mark = (mark & ~M) ^ V; --set-mark V/M is (mark & ~M) | V."""
    number, _, mask = value.partition("/")
    if not mask or int(mask, 0) == _FULL_MASK:
        return f"meta mark set {int(number, 0)}"
    keep = ~int(mask, 0) & _FULL_MASK
    return f"meta mark set meta mark and {keep:#x} {'xor' if xor else 'or'} {int(number, 0):#x}"


def _host_port(family: int, address: str, port: str) -> str:
    host = f"[{address}]" if family == 6 and address else address
    return f"{host}:{port.replace(':', '-')}" if port else host


def _target(rule: Rule, family: int) -> tuple[list[_Expr], str | None]:
    """(statements after `counter`, with the verdict last; the chain jumped to, if any)."""
    target, opts = rule.target, _options(rule)
    if target in _VERDICTS:
        return [_Expr(_VERDICTS[target], _VERDICTS[target])], None
    if target.startswith("ISTIO_"):
        text = f"jump {chain_name(target)}"
        return [_Expr(text, text)], target
    if target == "REDIRECT":
        port = opts.get("to-ports") or opts.get("to-port")
        text = f"redirect to :{port.replace(':', '-')}" if port else "redirect"
        return [_Expr(text, text)], None
    if target in ("DNAT", "SNAT"):
        where = opts.get("to-destination" if target == "DNAT" else "to-source", "")
        address, port = (where.rsplit(":", 1) if family == 4 and ":" in where else (where, ""))
        if family == 6 and where.startswith("["):
            address, _, port = where[1:].partition("]:")
        text = f"{target.lower()} {_ip(family)} to {_host_port(family, address, port)}"
        return [_Expr(text, f"{target.lower()} to")], None
    if target == "MARK":
        if "set-xmark" in opts or "set-mark" in opts:
            text = _set_mark(opts.get("set-xmark") or opts["set-mark"], "set-xmark" in opts)
            return [_Expr(text, text)], None
    if target == "CONNMARK":
        if "save-mark" in opts:
            return [_Expr("ct mark set meta mark", "ct mark set meta mark")], None
        if "restore-mark" in opts:
            return [_Expr("meta mark set ct mark", "meta mark set ct mark")], None
    if target == "CT" and "zone" in opts:
        text = f"ct zone set {opts['zone']}"
        return [_Expr(text, text)], None
    if target == "NFLOG":  # --iptables-trace-logging (Istio 1.12-1.24): the planner's own ASCII prefixes
        parts = [f'prefix "{opts["nflog-prefix"]}"' if "nflog-prefix" in opts else "",
                 f"group {opts['nflog-group']}" if "nflog-group" in opts else "",
                 f"snaplen {opts['nflog-size']}" if "nflog-size" in opts else ""]
        text = " ".join(["log", *filter(None, parts)])
        return [_Expr(text, text)], None
    raise NftRenderError(f"no nft form for -j {target} {' '.join('--' + k for k in opts)}".rstrip())


def _tproxy(rule: Rule, family: int) -> list[_Expr]:
    """TPROXY: the tproxy and mark statements come before the counter, then `accept` (Istio's order)."""
    opts = _options(rule)
    address = opts.get("on-ip", "")
    if address in ("0.0.0.0", "::"):
        address = ""
    stmts = [_Expr(f"tproxy {_ip(family)} to {_host_port(family, address, opts['on-port'])}",
                   f"tproxy to {address and 'ADDR'}:{opts['on-port']}")]
    if opts.get("tproxy-mark"):
        mark = _set_mark(opts["tproxy-mark"], xor=True)
        stmts.append(_Expr(mark, mark))
    return stmts


def write_rule(rule: Rule, family: int) -> _Written:
    """One plan rule in nft form for `family`: matches, `counter`, statements, verdict."""
    exprs: list[_Expr] = []
    if rule.in_interface:
        exprs.append(_interface("iifname", rule.in_interface))
    if rule.out_interface:
        exprs.append(_interface("oifname", rule.out_interface))
    protocol = rule.protocol
    if protocol is None and rule.option("conntrack", "ctstate") == Option("ctstate", "INVALID"):
        protocol = "tcp"  # Istio's nft rule set drops INVALID TCP only (its iptables form: any protocol)
    if protocol:
        exprs.append(_Expr(f"meta l4proto {protocol}", f"meta l4proto {protocol}"))
    addresses = []
    if rule.source:
        addresses.append(_address("saddr", rule.source, False))
    if rule.destination:
        addresses.append(_address("daddr", rule.destination, rule.negate_destination))
    # A conntrack state is tested before ports, as Istio writes it.
    matches = sorted(rule.matches, key=lambda m: m.module != "conntrack")
    match_exprs = [expr for match in matches for expr in _match(match, rule.protocol)]
    # In raw, Istio writes the port (and owner) before the address.
    exprs += match_exprs + addresses if rule.table == "raw" else addresses + match_exprs
    jump = None
    if rule.target == "TPROXY":
        exprs += _tproxy(rule, family) + [_Expr("counter", "counter"), _Expr("accept", "accept")]
    else:
        stmts, jump = _target(rule, family)
        exprs += [_Expr("counter", "counter"), *stmts]
    text = " ".join(e.text for e in exprs)
    key = " ".join(e.key for e in exprs)
    return _Written(text, key, any(e.addressed for e in exprs), jump)


class _Placed(NamedTuple):
    """A rule in the merged inet chain: its text and the families it is written for."""

    text: str
    families: frozenset[int]
    shared: bool  # one rule for both families
    written: _Written


class _Op(NamedTuple):
    op: str
    position: int
    written: _Written
    family: int


def _chain_ops(steps: Iterable[Step], family: int) -> dict[tuple[str, str], list[_Op]]:
    ops: dict[tuple[str, str], list[_Op]] = {}
    for step in steps:
        rule = step.rule
        ops.setdefault((rule.table, rule.chain), []).append(
            _Op(step.op, step.position, write_rule(rule, family), family))
    return ops


def _merge(v4: list[_Op], v6: list[_Op]) -> list[tuple[_Op, bool]]:
    """Both families' operations on one chain, twins side by side; (op, shared) pairs."""
    keys4 = [(op.op, op.written.key) for op in v4]
    keys6 = [(op.op, op.written.key) for op in v6]
    merged: list[tuple[_Op, bool]] = []
    matcher = difflib.SequenceMatcher(None, keys4, keys6, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for a, b in zip(v4[i1:i2], v6[j1:j2]):
                if a.written.text == b.written.text and a.position == b.position:
                    merged.append((a, True))
                else:
                    merged += [(a, False), (b, False)]
        else:
            merged += [(op, False) for op in v4[i1:i2]] + [(op, False) for op in v6[j1:j2]]
    return merged


class NftTable(NamedTuple):
    """One of our tables: its chains in creation order and each chain's final rules."""

    name: str
    base: dict[str, tuple[str, str, int]]  # nft chain -> (type, hook, priority)
    chains: list[str]  # nft names, creation order
    rules: dict[str, list[str]]  # nft chain -> rule texts


def _chain_sort_key(table: str, chain: str, first_use: dict[str, int]) -> tuple[int, int]:
    if (table, chain) in BASE_CHAINS:
        return 0, HOOK_ORDER.index(chain)
    if chain in CHAIN_ORDER:
        return 1, CHAIN_ORDER.index(chain)
    return 2, first_use[chain]


def build_tables(plan: RulePlan, guard_single_family: bool = False) -> list[NftTable]:
    """Our tables for `plan`: only chains that hold rules (or are jumped to), no empty table.

    An inet table sees IPv6 packets even when the plan has no IPv6 rules.
    Istio's nft rule set lets its IPv4 rules act on them; with
    `guard_single_family` an IPv4-only plan instead leaves IPv6 alone, as
    iptables does (only ip_tables is written): its base-chain rules, the only
    way into the others, get `meta nfproto ipv4`.
    """
    per_family = {fam.family: _chain_ops(fam.steps, fam.family) for fam in plan.families()}
    v4, v6 = per_family.get(4, {}), per_family.get(6, {})
    placed: dict[tuple[str, str], list[_Placed]] = {}
    for key in list(dict.fromkeys([*v4, *v6])):
        chain: list[_Placed] = []
        for op, shared in _merge(v4.get(key, []), v6.get(key, [])):
            families = frozenset((4, 6)) if shared else frozenset((op.family,))
            item = _Placed(op.written.text, families, shared, op.written)
            if op.op == INSERT:
                chain.insert(op.position - 1, item)
            else:
                chain.append(item)
        placed[key] = chain
    both = {4, 6} if plan.ipv6 is not None else {4}

    def holds(table: str, chain: str, family: int) -> bool:
        return any(family in item.families for item in placed.get((table, chain), ()))

    def text(table: str, chain: str, item: _Placed) -> str:
        if item.written.self_guarded:
            return item.text
        if len(both) == 1:
            guard = guard_single_family and (table, chain) in BASE_CHAINS
            return f"{_NFPROTO[4]} {item.text}" if guard else item.text
        if item.shared:
            return item.text
        (family,) = item.families
        other = 6 if family == 4 else 4
        if item.written.jump and not holds(table, item.written.jump, other):
            return item.text  # a no-op for the other family, as Istio writes it
        return f"{_NFPROTO[family]} {item.text}"

    tables = []
    for table in TABLES:
        keys = [key for key in placed if key[0] == table and placed[key]]
        if not keys:
            continue
        used = [chain for _, chain in keys]
        used += [item.written.jump for key in keys for item in placed[key]
                 if item.written.jump and item.written.jump not in used]
        first_use = {chain: i for i, chain in enumerate(dict.fromkeys(used))}
        order = sorted(first_use, key=lambda c: _chain_sort_key(table, c, first_use))
        base = {chain_name(c): (*BASE_CHAINS[(table, c)][:1], c.lower(), BASE_CHAINS[(table, c)][1])
                for c in order if (table, c) in BASE_CHAINS}
        rules = {chain_name(c): [text(table, c, item) for item in placed.get((table, c), [])] for c in order}
        tables.append(NftTable(table_name(table), base, [chain_name(c) for c in order], rules))
    return tables


def _reset_lines() -> list[str]:
    """`add` then `delete` of each of our tables: removes it whether or not it exists."""
    lines = []
    for table in TABLES:
        lines += [f"add table {FAMILY} {table_name(table)}", f"delete table {FAMILY} {table_name(table)}"]
    return lines


class TransactionLine(NamedTuple):
    """What one line of the transaction does, to name it when nft reports an error at that line."""

    table: str
    chain: str
    rule: str


def transaction(plan: RulePlan, guard_single_family: bool = False) -> tuple[str, list[TransactionLine]]:
    """The apply transaction and, per line (0-based), the table, chain and rule it adds."""
    lines = _reset_lines()
    where = [TransactionLine(table_name(t), "", "") for t in TABLES for _ in range(2)]
    for table in build_tables(plan, guard_single_family):
        lines.append(f"add table {FAMILY} {table.name}")
        where.append(TransactionLine(table.name, "", ""))
        for chain in table.chains:
            spec = ""
            if chain in table.base:
                kind, hook, priority = table.base[chain]
                spec = f" {{ type {kind} hook {hook} priority {priority} ; }}"
            lines.append(f"add chain {FAMILY} {table.name} {chain}{spec}")
            where.append(TransactionLine(table.name, chain, ""))
        for chain in table.chains:
            for rule in table.rules[chain]:
                lines.append(f"add rule {FAMILY} {table.name} {chain} {rule}")
                where.append(TransactionLine(table.name, chain, rule))
    return "\n".join(lines) + "\n", where


def render_transaction(plan: RulePlan, guard_single_family: bool = False) -> str:
    """The dry-run text of --native-nftables: exactly what an apply loads."""
    return transaction(plan, guard_single_family)[0]


def clean_transaction() -> str:
    """`clean`: our tables removed, whether or not they exist, in one transaction."""
    return "\n".join(_reset_lines()) + "\n"

