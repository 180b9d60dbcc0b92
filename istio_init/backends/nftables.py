"""The native nftables backend: one libnftables transaction for both families and all tables.

libnftables is driven in-process through Debian's python3-nftables (a ctypes
binding), not by running `nft`: a pod start reads the live ruleset and loads
the transaction (a re-run also reads the result back), and an `nft` process
per call costs more than one library context (benchmarks/nft_startup.py;
docs/nftables.md).
The transaction is handed over as a file (a memfd), the way `nft -f` reads it,
because only then does libnftables report the line of a failing command,
which is how an error names the table, chain and rule.

Everything read from the kernel is read as JSON (`list ruleset` with JSON
output); the text listing is only ever printed, never parsed.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from istio_init.errors import ApplyError, rollback_outcome
from istio_init.model import RulePlan
from istio_init.nft.write import FAMILY, TABLES, TransactionLine, clean_transaction, table_name, transaction
from istio_init.system import current

OUR_TABLES = tuple(table_name(t) for t in TABLES)
_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
_TABLE_LINE = re.compile(r"^(add|delete) table (\S+) (\S+)$", re.MULTILINE)
_ERROR_LINE = re.compile(r"^\S+?:(\d+):[\d-]+: Error: (.*)$", re.MULTILINE)


class NftUndo:
    """Our tables as they were before a change (JSON objects of `list ruleset`), to put them back."""

    def __init__(self, backend: "NftablesBackend", objects: list[dict[str, Any]], changed: tuple[str, ...]) -> None:
        self.backend = backend
        self.objects = objects
        self._changed = changed

    @property
    def changed(self) -> tuple[str, ...]:
        return self._changed

    @property
    def previous_marks(self) -> frozenset[int]:
        return frozenset(divert_marks(self.objects))

    def undo(self) -> list[str]:
        if not self._changed:
            return []
        try:
            self.backend.restore(self.objects)
        except ApplyError as exc:
            return [f"{exc}; `istio-init clean --native-nftables` removes istio-init's tables"]
        return []


def divert_marks(objects: list[dict[str, Any]]) -> set[int]:
    """TPROXY marks our live `istio-divert` chain sets (their routes are ours to remove)."""
    marks = set()
    for obj in objects:
        rule = obj.get("rule")
        if not rule or rule["table"] != OUR_TABLES[1] or rule["chain"] != "istio-divert":
            continue
        for expr in rule.get("expr", []):
            mangle = expr.get("mangle")
            if mangle and mangle.get("key") == {"meta": {"key": "mark"}} and isinstance(mangle.get("value"), int):
                marks.add(mangle["value"])
    return marks


# The one rule set whose nft form is Istio's own (current Istio's nftables mode), which has no
# family guard; every older release had iptables only, so their nft form keeps iptables' family
# scope: on an IPv4-only pod IPv6 is left alone.
_UNGUARDED_RULE_SETS = frozenset({"current"})


def guard_single_family(rules_version: str) -> bool:
    """Whether IPv4-only plans get `meta nfproto ipv4` (every rule set but current)."""
    return rules_version not in _UNGUARDED_RULE_SETS


def _reset_commands() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name in OUR_TABLES:
        table = {"table": {"family": FAMILY, "name": name}}
        out += [{"add": table}, {"delete": table}]
    return out


def _is_ours(obj: dict[str, Any]) -> bool:
    (kind, body), = obj.items()
    if kind == "metainfo" or body.get("family") != FAMILY:
        return False
    return (body.get("name") if kind == "table" else body.get("table")) in OUR_TABLES


class NftablesBackend:
    """Reads, replaces and removes the `inet istio-proxy-*` tables, each change one transaction.

    The kernel applies a transaction whole or not at all, so a refused one
    changed nothing; `converge` and `remove` hand back an NftUndo holding our
    tables as they were, which apply.py uses when a later step fails.
    """

    name = "nftables"

    def __init__(self, guard_single_family: bool = False) -> None:
        self._nft = current().nftables()
        self.guard_single_family = guard_single_family
        self.loaded = ""  # the last transaction the kernel accepted (printed, as Istio's nft mode logs it)

    # ---- reading ----------------------------------------------------------------------

    def read(self, family: int = 0) -> list[dict[str, Any]]:
        """The whole live ruleset (both families: inet tables serve both), as `nft -j list ruleset` objects."""
        return self.read_ruleset()

    def read_ruleset(self) -> list[dict[str, Any]]:
        """The whole live ruleset, as the objects of `nft -j list ruleset`."""
        self._nft.set_json_output(True)
        try:
            rc, out, err = self._nft.cmd("list ruleset")
        finally:
            self._nft.set_json_output(False)
        if rc != 0:
            raise ApplyError(f"nft list ruleset failed: {err.strip()}")
        return [obj for obj in json.loads(out)["nftables"] if "metainfo" not in obj]

    def ours(self) -> list[dict[str, Any]]:
        return [obj for obj in self.read_ruleset() if _is_ours(obj)]

    def holds_ours(self, families: Sequence[int] = ()) -> bool:
        return any("table" in obj for obj in self.ours())

    def dump(self, family: int, tables: Sequence[str] = ()) -> str:
        """What is printed after a change: the transaction the kernel accepted (IPv4's turn; inet is both)."""
        if family != 4:
            return ""
        return self.loaded or self.listing()

    def listing(self, ours: list[dict[str, Any]] | None = None) -> str:
        """Our tables as `nft list` prints them (for the log; never parsed); `ours`: a fresh read, if at hand."""
        present = {obj["table"]["name"] for obj in (self.ours() if ours is None else ours) if "table" in obj}
        out = []
        for name in OUR_TABLES:
            if name in present:
                rc, text, err = self._nft.cmd(f"list table {FAMILY} {name}")
                if rc != 0:
                    raise ApplyError(f"nft list table {FAMILY} {name} failed: {err.strip()}")
                out.append(text)
        return "".join(out)

    def as_loaded(self, text: str) -> list[dict[str, Any]]:
        """Our tables as the kernel would hold them after loading `text`, without touching this namespace.

        `check --native-nftables` compares in the kernel's own canonical form:
        the transaction is loaded into a scratch network namespace made by a
        child process (with a user namespace when this process may not make a
        network namespace itself) and read back as JSON there.
        """
        import ctypes

        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into the caller's code
            status = 1
            try:
                os.close(read_end)
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.unshare(_CLONE_NEWNET) != 0 and libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
                    raise ApplyError("cannot make a scratch network namespace to load the plan in: "
                                     f"{os.strerror(ctypes.get_errno())}")
                scratch = NftablesBackend(self.guard_single_family)
                scratch.load(text, [])
                payload = json.dumps(scratch.ours()).encode()
                status = 0
            except BaseException as exc:  # everything must reach the parent as a message
                payload = (str(exc) or type(exc).__name__).encode()
            finally:
                with os.fdopen(write_end, "wb") as pipe:
                    pipe.write(payload)
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise ApplyError(data.decode(errors="replace"))
        objects: list[dict[str, Any]] = json.loads(data)
        return objects

    # ---- changing ---------------------------------------------------------------------

    def transaction(self, plan: RulePlan) -> tuple[str, list[TransactionLine]]:
        return transaction(plan, guard_single_family=self.guard_single_family)

    def load(self, text: str, where: list[TransactionLine] | None = None) -> None:
        """Commit `text` as one transaction; on refusal the error names the line's table, chain and rule."""
        fd = os.memfd_create("istio-init-nft")
        try:
            os.write(fd, text.encode())
            rc, _, err = self._nft.cmd_from_file(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        if rc != 0:
            raise ApplyError(_describe(err, text, where or []))

    def converge(self, plan: RulePlan, families: Sequence[int] = ()) -> NftUndo:
        """Replace our tables with `plan`'s in one transaction; returns how to put the old ones back."""
        return self._change(*self.transaction(plan))

    def remove(self, families: Sequence[int] = ()) -> NftUndo:
        """Delete our tables (whichever exist) in one transaction."""
        return self._change(clean_transaction(), [])

    def describe_removal(self, families: Sequence[int] = ()) -> str:
        """`clean -n`: the deletes of the tables that exist."""
        present = {obj["table"]["name"] for obj in self.ours() if "table" in obj}
        return "".join(line + "\n" for line in clean_transaction().splitlines()
                       if line.startswith("delete") and line.split()[-1] in present)

    def _change(self, text: str, where: list[TransactionLine]) -> NftUndo:
        before = self.ours()
        try:
            self.load(text, where)
        except ApplyError as exc:  # the kernel applies a transaction whole or not at all
            raise rollback_outcome(exc, [], changed=False) from None
        if not before:
            # None of our tables existed, so the accepted transaction left exactly the tables it
            # creates: nothing to read back. (Reading 8,000 rules back as JSON took longer than
            # loading them, and most of the process's memory.)
            self.loaded = text
            return NftUndo(self, before, _tables_left(text))
        try:
            after = self.ours()  # what the commit left, read back
        except BaseException as exc:  # anything after the commit puts the previous tables back
            problems = []
            try:
                self.restore(before)
            except ApplyError as again:
                problems.append(str(again))
            raise rollback_outcome(exc, problems) from None
        self.loaded = text
        changed = tuple(sorted({obj["table"]["name"] for obj in before + after if "table" in obj}))
        return NftUndo(self, before, changed if _strip(before) != _strip(after) else ())

    def restore(self, objects: list[dict[str, Any]]) -> None:
        """Put our tables back exactly as `objects` hold them (counters included), in one transaction."""
        commands = _reset_commands()
        for obj in objects:
            (kind, body), = obj.items()
            commands.append({"add": {kind: {k: v for k, v in body.items() if k != "handle"}}})
        rc, _, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise ApplyError(f"restoring the previous nftables ruleset failed: {err.strip()}")


def _tables_left(text: str) -> tuple[str, ...]:
    """Our tables a transaction leaves when none existed before it: those it adds and does not delete again."""
    present: set[str] = set()
    for verb, family, name in _TABLE_LINE.findall(text):  # one scan, not a split of 8,000 rule lines
        if family == FAMILY and name in OUR_TABLES:
            if verb == "add":
                present.add(name)
            else:
                present.discard(name)
    return tuple(sorted(present))


def _strip(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects without handles and counters, to tell whether a transaction changed anything."""
    out = []
    for obj in objects:
        (kind, body), = obj.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "rule":
            body["expr"] = [e for e in body.get("expr", []) if "counter" not in e]
        out.append({kind: body})
    return out


def _place(line: str) -> TransactionLine | None:
    """What an `add table|chain|rule FAMILY TABLE [CHAIN [RULE]]` line adds, read from the line itself."""
    words = line.split(" ", 5)
    if len(words) < 4 or words[0] != "add" or words[1] not in ("table", "chain", "rule"):
        return None
    chain = words[4] if words[1] != "table" and len(words) > 4 else ""
    return TransactionLine(words[3], chain, words[5] if words[1] == "rule" and len(words) > 5 else "")


def _describe(err: str, text: str, where: list[TransactionLine]) -> str:
    """nft's error, with what the failing line was adding.

    A line past the text's end (the kernel was handed more than this module
    wrote) is named by the copy nft prints under its error.
    """
    found = _ERROR_LINE.search(err)
    if not found:
        return f"nft transaction refused: {err.strip()}"
    number, message = int(found.group(1)), found.group(2).strip()
    lines = text.splitlines()
    line = lines[number - 1] if 0 < number <= len(lines) else err[found.end():].lstrip("\n").split("\n", 1)[0]
    place = where[number - 1] if 0 < number <= len(where) else _place(line)
    if place and place.rule:
        what = f"table {FAMILY} {place.table}, chain {place.chain}, rule '{place.rule}'"
    elif place and place.chain:
        what = f"table {FAMILY} {place.table}, chain {place.chain}"
    elif place:
        what = f"table {FAMILY} {place.table}"
    else:
        what = f"'{line}'"
    return f"nft transaction refused at line {number} ({what}): {message}"
