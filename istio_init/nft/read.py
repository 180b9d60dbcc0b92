"""Our nft tables as the kernel lists them in JSON, read back as one IP family's plan rules.

`trace` and `graph` walk model.Rules (iptables' vocabulary: tables, built-in
chains, matches, targets). This maps the JSON of our `inet istio-proxy-*`
tables (`nft -j list ruleset`, read by installed.py) back onto that vocabulary
for one IP family, undoing what write.py wrote: a rule guarded for, or
addressing, the other family is not part of this family's ruleset. Values come
back as the rule sets spell them (marks in hex, conntrack states in
iptables' order, CONNMARK's masks, TPROXY's address), so a rule read back
equals the rule planned (tests/test_nft_roundtrip.py). Only the expressions
istio-init writes are understood; anything else is a TraceError that names the
rule, so a trace never guesses.
"""

from __future__ import annotations

from typing import Any

from istio_init.model import Match, Option, Rule
from istio_init.nft.write import TABLE_PREFIX
from istio_init.errors import TraceError

Ruleset = dict[str, dict[str, list[Rule]]]
_VERDICTS = {"return": "RETURN", "accept": "ACCEPT", "drop": "DROP"}
_NFPROTO = {4: "ipv4", 6: "ipv6"}
_IP = {4: "ip", 6: "ip6"}
# CONNMARK copies the whole mark (iptables-save prints the masks of --save-mark and --restore-mark).
_WHOLE_MARKS = (Option("nfmask", "0xffffffff"), Option("ctmask", "0xffffffff"))
# iptables-save's order of conntrack states (libxt_conntrack), whatever order nft lists them in.
_CTSTATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")


class _OtherFamily(Exception):
    """The rule applies to the other IP family only."""


def _chain_name(chain: dict[str, Any]) -> str:
    """A base chain by its hook (prerouting -> PREROUTING), a regular one as ISTIO_ spells it."""
    return str(chain["hook"]).upper() if "hook" in chain else str(chain["name"]).upper().replace("-", "_")


def _address(value: Any, family: int) -> str:
    if isinstance(value, dict) and "prefix" in value:
        return f"{value['prefix']['addr']}/{value['prefix']['len']}"
    return f"{value}/{128 if family == 6 else 32}"


def _ports(value: Any) -> tuple[str, bool]:
    """(iptables port spec, whether it is a list)."""
    if isinstance(value, dict) and "set" in value:
        items = [f"{i['range'][0]}:{i['range'][1]}" if isinstance(i, dict) else str(i) for i in value["set"]]
        return ",".join(items), True
    if isinstance(value, dict) and "range" in value:
        return f"{value['range'][0]}:{value['range'][1]}", False
    return str(value), False


class _Builder:
    def __init__(self, table: str, chain: str, family: int, names: dict[str, str]) -> None:
        self.table, self.chain, self.family, self.names = table, chain, family, names
        self.parts: dict[str, Any] = {}
        self.matches: list[Match] = []
        self.target: str | None = None
        self.target_options: list[Option] = []

    def fail(self, expr: dict[str, Any]) -> TraceError:
        return TraceError(f"cannot evaluate nft rule in {TABLE_PREFIX}{self.table} {self.chain}: {expr}")

    def match(self, body: dict[str, Any], expr: dict[str, Any]) -> None:
        left, right, negated = body["left"], body["right"], body["op"] == "!="
        if body["op"] not in ("==", "!=", "in"):
            raise self.fail(expr)
        if "meta" in left:
            key = left["meta"]["key"]
            if key == "nfproto":
                if (right == _NFPROTO[self.family]) == negated:
                    raise _OtherFamily
            elif key in ("iifname", "oifname") and not negated:
                name = right[:-1] + "+" if right.endswith("*") and not right.endswith("\\*") else right
                self.parts["in_interface" if key == "iifname" else "out_interface"] = name.replace("\\*", "*")
            elif key == "l4proto" and not negated:
                self.parts["protocol"] = right
            elif key in ("skuid", "skgid"):
                self.matches.append(Match("owner", (Option(f"{key[2]}id-owner", str(right), negated),)))
            elif key == "mark" and isinstance(right, int):
                self.matches.append(Match("mark", (Option("mark", f"{right:#x}", negated),)))
            else:
                raise self.fail(expr)
        elif "payload" in left:
            protocol, field = left["payload"]["protocol"], left["payload"]["field"]
            if protocol in ("ip", "ip6") and field in ("saddr", "daddr"):
                if protocol != _IP[self.family]:
                    raise _OtherFamily
                if field == "saddr" and negated:
                    raise self.fail(expr)
                self.parts["source" if field == "saddr" else "destination"] = _address(right, self.family)
                if field == "daddr" and negated:
                    self.parts["negate_destination"] = True
            elif protocol in ("tcp", "udp") and field in ("dport", "sport"):
                self.parts.setdefault("protocol", protocol)
                spec, many = _ports(right)
                module = "multiport" if many else protocol
                self.matches.append(Match(module, (Option(field + ("s" if many else ""), spec, negated),)))
            else:
                raise self.fail(expr)
        elif left == {"ct": {"key": "state"}}:
            if isinstance(right, dict) and "|" in right:  # a negated list of states: `ct state != a | b`
                right = right["|"]
            states = {str(state).upper() for state in (right if isinstance(right, list) else [right])}
            if not states <= set(_CTSTATES):
                raise self.fail(expr)
            self.matches.append(Match("conntrack", (Option("ctstate", ",".join(s for s in _CTSTATES if s in states),
                                                           negated),)))
        elif left == {"ct": {"key": "mark"}} and isinstance(right, int):
            self.matches.append(Match("connmark", (Option("mark", f"{right:#x}", negated),)))
        else:
            raise self.fail(expr)

    def statement(self, kind: str, body: Any, expr: dict[str, Any]) -> None:
        if kind == "counter":
            return
        if kind in _VERDICTS:
            if self.target is None:  # after tproxy, `accept` is part of the TPROXY target
                self.target = _VERDICTS[kind]
        elif kind == "jump":
            self.target = self.names.get(body["target"]) or body["target"].upper().replace("-", "_")
        elif kind == "redirect":
            self.target = "REDIRECT"
            if "port" in body:
                self.target_options.append(Option("to-ports", str(body["port"])))
        elif kind in ("dnat", "snat"):
            if body.get("family") and body["family"] != _IP[self.family]:
                raise _OtherFamily
            where = body.get("addr", "")
            if self.family == 6 and "port" in body:
                where = f"[{where}]"
            where += f":{body['port']}" if "port" in body else ""
            self.target = kind.upper()
            self.target_options.append(Option("to-destination" if kind == "dnat" else "to-source", where))
        elif kind == "log":
            self.target = "NFLOG"
            self.target_options += [Option(f"nflog-{name}", str(body[key])) for name, key in
                                    (("prefix", "prefix"), ("group", "group"), ("size", "snaplen")) if key in body]
        elif kind == "tproxy":
            if body.get("family") and body["family"] != _IP[self.family]:
                raise _OtherFamily
            self.target = "TPROXY"
            self.target_options.append(Option("on-port", str(body["port"])))
            # No address is the socket's own (iptables-save prints --on-ip 0.0.0.0 or ::).
            self.target_options.append(Option("on-ip", body.get("addr", "0.0.0.0" if self.family == 4 else "::")))
        elif kind == "mangle":
            key, value = body["key"], body["value"]
            if key == {"meta": {"key": "mark"}} and isinstance(value, int):
                if self.target == "TPROXY":
                    self.target_options.append(Option("tproxy-mark", f"{value:#x}/0xffffffff"))
                else:
                    self.target = "MARK"
                    self.target_options.append(Option("set-xmark", f"{value:#x}/0xffffffff"))
            elif key == {"ct": {"key": "mark"}} and value == {"meta": {"key": "mark"}}:
                self.target, self.target_options = "CONNMARK", [Option("save-mark"), *_WHOLE_MARKS]
            elif key == {"meta": {"key": "mark"}} and value == {"ct": {"key": "mark"}}:
                self.target, self.target_options = "CONNMARK", [Option("restore-mark"), *_WHOLE_MARKS]
            elif key == {"ct": {"key": "zone"}}:
                self.target, self.target_options = "CT", [Option("zone", str(value))]
            else:
                raise self.fail(expr)
        else:
            raise self.fail(expr)

    def rule(self) -> Rule:
        if self.target is None:
            raise TraceError(f"nft rule in {TABLE_PREFIX}{self.table} {self.chain} has no verdict or statement")
        return Rule(self.table, self.chain, self.target, matches=tuple(self.matches),
                    target_options=tuple(self.target_options), **self.parts)


def ruleset_from_json(objects: list[dict[str, Any]], family: int) -> Ruleset:
    """`family`'s rules of our tables, per table and chain, in kernel order."""
    ruleset: Ruleset = {}
    names: dict[tuple[str, str], str] = {}
    for obj in objects:
        if "chain" in obj:
            chain = obj["chain"]
            table = chain["table"][len(TABLE_PREFIX):]
            names[(chain["table"], chain["name"])] = _chain_name(chain)
            ruleset.setdefault(table, {}).setdefault(_chain_name(chain), [])
    for obj in objects:
        if "rule" not in obj:
            continue
        body = obj["rule"]
        table = body["table"][len(TABLE_PREFIX):]
        chain = names[(body["table"], body["chain"])]
        table_names = {nft: name for (t, nft), name in names.items() if t == body["table"]}
        builder = _Builder(table, chain, family, table_names)
        try:
            for expr in body["expr"]:
                (kind, value), = expr.items()
                if kind == "match":
                    builder.match(value, expr)
                else:
                    builder.statement(kind, value, expr)
        except _OtherFamily:
            continue
        ruleset[table][chain].append(builder.rule())
    return ruleset

