"""An in-memory host for istio-init's System seam (istio_init/system.py), so applies run without root.

Like knftables' `Fake`: the state a kernel would hold, kept as data and
changed the way the kernel changes it, with every change recorded:

- iptables: each flavour's (legacy, nft) tables per family, as iptables-save
  text. A commit applies each table's decided change with
  `reconcile.simulate` (through `printed.after_commit`, which spells the
  result as iptables-save does); a restore replaces whole tables.
- native nftables: a small libnftables stand-in that loads the transaction
  text istio-init writes (add/delete table, add chain, add rule) all or
  nothing, lists the ruleset as JSON and restores it from JSON.
- TPROXY policy rules, `local default` routes and addresses on lo; the
  namespace lock (which must not be taken twice at once); the pod's addresses.

A step that changes something has a name ("legacy IPv4 nat", "nftables
transaction", "route IPv4 table 133", ...). `FakeHost(fail_at=NAME)` fails
the first step so named: before it changes anything (a refusal), or with
`after=True` right after it changed (a fault after a commit); an nftables
transaction is all or nothing, so failing at it is always its refusal. `steps` lists
the names of every change made, so a test can fail each step in turn.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from typing import Any, Iterator, Mapping

from istio_init.backends.iptables.committed import after_commit
from istio_init.backends.iptables.reconcile import TableChange
from istio_init.iptables_save.read import normalize, parse_save
from istio_init.backends.iptables.tools import command
from istio_init.errors import ApplyError
from istio_init.model import NATIVE_TABLE_PREFIX
from istio_init.host.routing import Removed, Routing
from istio_init.system import System


class FakeHost(System):
    """A network namespace in memory; see the module docstring."""

    def __init__(self, iptables: Mapping[tuple[str, int], str] | None = None, legacy: bool = True,
                 addresses: tuple[str, ...] = ("192.0.2.10",), fail_at: str | None = None, after: bool = False,
                 error: BaseException | None = None) -> None:
        self.text: dict[tuple[str, int], str] = {key: "" for key in [("legacy", 4), ("legacy", 6), ("nft", 4), ("nft", 6)]}
        self.text.update(iptables or {})
        self.legacy = legacy  # whether the kernel offers legacy ip_tables at all
        self.addresses = [ipaddress.ip_address(a) for a in addresses]
        self.nft_objects: list[dict[str, Any]] = []  # the ruleset, as `nft -j list ruleset` objects
        self.routing: list[Routing] = []
        self.lo_addresses: list[str] = []
        self.fail_at, self.after, self.error = fail_at, after, error
        self.failed = False
        self.steps: list[str] = []  # every change made, by name
        self.calls: list[tuple[Any, ...]] = []  # every commit and restore, with its input
        self.locked = False

    # ---- faults ----------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """A change named `name`: fails here when it is the step to fail at (once)."""
        fail = name == self.fail_at and not self.failed
        if fail and not self.after:
            self.failed = True
            raise self.error or ApplyError(f"{name}: refused")
        yield
        self.steps.append(name)
        if fail:
            self.failed = True
            raise self.error or ApplyError(f"{name}: fault injected after its commit")

    # ---- what a test compares ------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything the host holds, in a comparable form (iptables normalized, nft without handles)."""
        return {"iptables": {key: normalize(text) for key, text in self.text.items()},
                "nftables": [_without_handle(obj) for obj in self.nft_objects],
                "routing": sorted(self.routing), "lo": sorted(self.lo_addresses)}

    def copy(self, **changes: Any) -> "FakeHost":
        """A host holding the same state (and `changes` to how it fails)."""
        again = FakeHost(self.text, self.legacy, tuple(map(str, self.addresses)), **changes)
        again.nft_objects = json.loads(json.dumps(self.nft_objects))
        again.routing, again.lo_addresses = list(self.routing), list(self.lo_addresses)
        return again

    # ---- the rule stores -----------------------------------------------------------------

    def iptables(self, name: str) -> "FakeTables":
        return FakeTables(self, name)

    def nftables(self) -> "FakeNftables":
        return FakeNftables(self)

    # ---- questions asked before choosing ----------------------------------------------------

    def iptables_nft_tables(self, family: int) -> set[str]:
        return set(parse_save(self.text[("nft", family)]))

    def legacy_tables(self, family: int) -> set[str] | None:
        return set(parse_save(self.text[("legacy", family)])) if self.legacy else None

    def native_nft_tables(self) -> set[str]:
        return {obj["table"]["name"] for obj in self.nft_objects
                if "table" in obj and obj["table"]["name"].startswith(NATIVE_TABLE_PREFIX)}

    # ---- routes and addresses ----------------------------------------------------------------

    def add_policy_route(self, family: int, fwmark: int, table: int) -> list[Routing]:
        added = []
        route, rule = Routing("route", family, 0, table), Routing("rule", family, fwmark, table)
        try:
            if route not in self.routing:
                with self.step(f"route IPv{family} table {table}"):
                    self.routing.append(route)
                    added.append(route)
            if rule not in self.routing:
                with self.step(f"rule IPv{family} fwmark {fwmark:#x}"):
                    self.routing.append(rule)
                    added.append(rule)
        except BaseException:
            self.routing = [item for item in self.routing if item not in added]  # nothing half made
            raise
        return added

    def remove_routing(self, items: list[Routing], removed: list[Removed] | None = None) -> list[Removed]:
        removed = [] if removed is None else removed
        for item in items:
            if item in self.routing:
                with self.step(f"remove {item}"):
                    self.routing.remove(item)
                    removed.append(Removed(item, None))
        return removed

    def restore_routing(self, removed: list[Removed]) -> None:
        for entry in sorted(removed, key=lambda e: e.item.kind != "route"):
            if entry.item not in self.routing:
                with self.step(f"restore {entry.item}"):
                    self.routing.append(entry.item)

    def owned_routing(self, family: int, marks: set[int], tables: set[int]) -> list[Routing]:
        """As netns.owned_routing; all the fake's routing was made by istio-init (netns marks it with
        ROUTING_PROTOCOL), so all of the family's is istio-init's, whatever the marks and tables."""
        return [item for item in self.routing if item.family == family]

    def routing_present(self, marks: set[int], tables: set[int]) -> bool:
        return any(self.owned_routing(family, marks, tables) for family in (4, 6))

    def loopback_ipv6_addresses(self) -> set[str]:
        return set(self.lo_addresses)

    def has_loopback_address(self, address: str) -> bool:
        return address in self.lo_addresses

    def add_loopback_address(self, address: str) -> bool:
        if address in self.lo_addresses:
            return False
        with self.step(f"address {address} on lo"):
            self.lo_addresses.append(address)
        return True

    def remove_loopback_address(self, address: str) -> bool:
        if address not in self.lo_addresses:
            return False
        with self.step(f"remove address {address} on lo"):
            self.lo_addresses.remove(address)
        return True

    # ---- the namespace and the process ---------------------------------------------------------

    def enter_namespace(self, path: str, label: str) -> None:
        self.calls.append(("enter", path))

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        assert not self.locked, "istio-init's namespace lock taken twice at once"
        self.locked = True
        try:
            yield
        finally:
            self.locked = False

    def namespace_lock(self) -> contextlib.AbstractContextManager[None]:
        return self._lock()

    def detect_ipv6(self) -> bool:
        return bool(self.addresses) and self.addresses[0].version == 6

    def pod_addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return list(self.addresses)

    def has_net_admin(self) -> bool | None:
        return True

    def in_initial_namespace(self) -> bool:
        return False


class FakeTables:
    """One backend's view of the fake's iptables tables (libiptc works on the legacy ones)."""

    def __init__(self, host: FakeHost, name: str) -> None:
        self.host = host
        self.name = name
        self.flavour = "legacy" if name == "libiptc" else name

    def session(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def save(self, family: int, counters: bool = True) -> str:
        return self.host.text[(self.flavour, family)]

    def snapshot(self, family: int) -> str:
        return self.save(family)

    def restore(self, family: int, saved_blocks: str) -> None:
        self.host.calls.append(("restore", self.flavour, family, saved_blocks))
        key = (self.flavour, family)
        with self.host.step(f"{self.flavour} IPv{family} restore"):
            replaced = parse_save(saved_blocks)
            kept = [block for name, block in _blocks(self.host.text[key]) if name not in replaced]
            self.host.text[key] = "".join(kept) + saved_blocks

    def commit(self, changes: Mapping[int, list[TableChange]]) -> None:
        for family, family_changes in changes.items():
            key = (self.flavour, family)
            for change in family_changes:
                with self.host.step(f"{self.flavour} IPv{family} {change.table}"):
                    self.host.calls.append(("commit", self.flavour, family, change.table))
                    live = parse_save(self.host.text[key])
                    names = list(dict.fromkeys([*live, change.table]))
                    # The change as decided, simulated on the table as it is now.
                    self.host.text[key] = after_commit(self.host.text[key], [change._replace(after=None)], names)

    def restore_tool(self, family: int) -> str:
        return command(family, f"-{self.flavour}-restore")


def _blocks(text: str) -> list[tuple[str, str]]:
    """(table, its `*table ... COMMIT` block) of save text."""
    found = []
    for block in re.findall(r"^\*\S+\n.*?^COMMIT\n", text, re.MULTILINE | re.DOTALL):
        found.append((block.splitlines()[0][1:], block))
    return found


_ADD = re.compile(r"^add (table|chain|rule) (\S+) (\S+)(?: (\S+))?(?: (.*))?$")
_MARK_SET = re.compile(r"meta mark set (\S+)")


class FakeNftables:
    """The parts of a libnftables context istio-init uses, on the fake's ruleset."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.json = False

    def set_json_output(self, on: bool) -> None:
        self.json = on

    def cmd(self, text: str) -> tuple[int, str, str]:
        if text == "list ruleset":
            return 0, json.dumps({"nftables": [{"metainfo": {}}, *self.host.nft_objects]}), ""
        words = text.split()
        if words[:2] == ["list", "table"]:
            objects = [obj for obj in self.host.nft_objects if _table_of(obj) == words[3]]
            return 0, "".join(f"{kind} {json.dumps(body)}\n" for obj in objects for kind, body in obj.items()), ""
        return 1, "", f"Error: the fake does not know `{text}`"

    def cmd_from_file(self, path: str) -> tuple[int, str, str]:
        with open(path) as loaded:
            text = loaded.read()
        objects = json.loads(json.dumps(self.host.nft_objects))
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            problem = _load_line(objects, line)
            if problem:
                return 1, "", f"{path}:{number}:1-{len(line)}: Error: {problem}\n{line}\n"
        # A transaction is all or nothing: failing at it (before or "after") is the kernel refusing it.
        if self.host.fail_at == "nftables transaction" and not self.host.failed:
            self.host.failed = True
            return 1, "", f"{path}:{len(lines)}:1-1: Error: nftables transaction: refused\n{lines[-1]}\n"
        self.host.nft_objects = objects
        self.host.steps.append("nftables transaction")
        return 0, "", ""

    def json_cmd(self, document: dict[str, Any]) -> tuple[int, Any, str]:
        objects = json.loads(json.dumps(self.host.nft_objects))
        for command in document["nftables"]:
            (verb, obj), = command.items()
            (kind, body), = obj.items()
            if verb == "delete":
                objects = [o for o in objects if _table_of(o) != body["name"]]
            elif kind != "table" or not any(_table_of(o) == body["name"] and "table" in o for o in objects):
                objects.append({kind: dict(body)})
        with self.host.step("nftables restore"):
            self.host.nft_objects = objects
        return 0, None, ""


def _table_of(obj: dict[str, Any]) -> str:
    (kind, body), = obj.items()
    return str(body.get("name") if kind == "table" else body.get("table"))


def _load_line(objects: list[dict[str, Any]], line: str) -> str:
    """Apply one transaction line to `objects`; the error nft would give, or ""."""
    words = line.split()
    if not words:
        return ""
    if words[0] == "delete" and words[1] == "table":
        objects[:] = [o for o in objects if _table_of(o) != words[3]]
        return ""
    found = _ADD.match(line)
    if not found:
        return f"the fake cannot load `{line}`"
    kind, family, table, chain, rest = found.groups()
    tables = {_table_of(o) for o in objects if "table" in o}
    if kind == "table":
        if table not in tables:
            objects.append({"table": {"family": family, "name": table, "handle": len(objects)}})
        return ""
    if table not in tables:
        return "Could not process rule: No such file or directory"
    chains = {o["chain"]["name"] for o in objects if "chain" in o and o["chain"]["table"] == table}
    if kind == "chain":
        if chain not in chains:
            objects.append({"chain": {"family": family, "table": table, "name": chain, "handle": len(objects)}})
        return ""
    jump = re.search(r"\b(?:jump|goto) (\S+)", rest or "")
    if chain not in chains or (jump and jump.group(1) not in chains):
        return "Could not process rule: No such file or directory"
    expr: list[dict[str, Any]] = [{"text": rest}]
    mark = _MARK_SET.search(rest or "")
    if mark:
        expr.append({"mangle": {"key": {"meta": {"key": "mark"}}, "value": int(mark.group(1), 0)}})
    objects.append({"rule": {"family": family, "table": table, "chain": chain, "expr": expr,
                             "handle": len(objects)}})
    return ""


def _without_handle(obj: dict[str, Any]) -> dict[str, Any]:
    (kind, body), = obj.items()
    return {kind: {k: v for k, v in body.items() if k != "handle"}}
