"""Reading `iptables-save` text back into the plan's model.

The live state of a namespace is read as iptables-save text (cheap, and the
same for the legacy and nft tools) and parsed once, here: each rule keeps its
canonical text (what reconcile compares and deletes by) and, when the model
can hold it, the `model.Rule` it spells (what ownership, trace and drift
checks reason about). Everything after this module works on that data, so
idempotency is decided by pure functions, without the kernel.
"""

from __future__ import annotations

from istio_init.iptables_save.write import QUOTED_OPTIONS
from istio_init.model import Match, Option, Rule, is_builtin
from istio_init.records import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from typing import Iterable


class SavedRule(NamedTuple):
    """One `-A CHAIN SPEC` line of a table: its canonical text, parsed into the model on demand.

    Parsing is deferred because most live rules sit in istio-init's own chains,
    which are flushed whole and never need a model: a plan of 8,000 CIDRs must
    not pay for parsing 8,000 rules on every pod start.
    """

    table: str
    chain: str
    spec: str

    @property
    def rule(self) -> Rule | None:
        """The rule as model.Rule; None for a shape istio-init never writes (see `problem`)."""
        return _parsed(self.table, self.chain, self.spec)[0]

    @property
    def problem(self) -> str:
        return _parsed(self.table, self.chain, self.spec)[1]


class SavedTable:
    """One `*table` block: chain policies (built-ins) or '-' (user chains), and rules.

    A plain class: importing dataclasses is start-up time (docs/performance.md).
    """

    def __init__(self, name: str, chains: dict[str, str] | None = None, rules: list[SavedRule] | None = None,
                 counters: dict[str, str] | None = None) -> None:
        self.name = name
        self.chains: dict[str, str] = {} if chains is None else chains  # chain -> policy or '-'
        self.rules: list[SavedRule] = [] if rules is None else rules
        self.counters: dict[str, str] = {} if counters is None else counters  # chain -> `[packets:bytes]`

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SavedTable) and (self.name, self.chains, self.rules, self.counters) == (
            other.name, other.chains, other.rules, other.counters)

    def __repr__(self) -> str:
        return f"SavedTable({self.name!r}, chains={self.chains!r}, rules={self.rules!r})"

    def chain_rules(self, chain: str) -> list[SavedRule]:
        return [rule for rule in self.rules if rule.chain == chain]

    def user_chains(self) -> list[str]:
        return [c for c in self.chains if not is_builtin(self.name, c)]


class UnmodelledRule(ValueError):
    """Rule text outside what model.Rule holds (a negated -s, a goto, ...)."""


def parse_rule(table: str, chain: str, spec: str) -> Rule:
    """Canonical iptables-save rule text (after `-A CHAIN`) as a model.Rule; the inverse of write.rule_spec."""
    words = rule_words(spec)
    parts: dict[str, str | bool] = {}
    matches: list[Match] = []
    target: str | None = None
    target_options: list[Option] = []

    def options(start: int) -> tuple[list[Option], int]:
        found: list[Option] = []
        j = start
        while j < len(words):
            negated = words[j] == "!" and j + 1 < len(words) and words[j + 1].startswith("--")
            name_at = j + 1 if negated else j
            if not words[name_at].startswith("--"):
                break
            value = ""
            free_text = words[name_at][2:] in QUOTED_OPTIONS  # its value may read like an option ("-x", "!")
            if name_at + 1 < len(words) and (free_text or not words[name_at + 1].startswith("-")
                                             and words[name_at + 1] != "!"):
                value = words[name_at + 1]
                j = name_at + 2
            else:
                j = name_at + 1
            found.append(Option(words[name_at][2:], value, negated))
        return found, j

    i = 0
    while i < len(words):
        word = words[i]
        negated = word == "!"
        if negated:
            i += 1
            if i >= len(words):
                raise UnmodelledRule("a lone '!'")
            word = words[i]
        if word in ("-s", "-d", "-i", "-o", "-p") and i + 1 < len(words):
            if negated and word != "-d":
                raise UnmodelledRule(f"negated {word} is not supported")
            key = {"-s": "source", "-d": "destination", "-i": "in_interface", "-o": "out_interface",
                   "-p": "protocol"}[word]
            parts[key] = words[i + 1]
            if negated:
                parts["negate_destination"] = True
            i += 2
        elif word == "-m" and i + 1 < len(words):
            module = words[i + 1]
            opts, i = options(i + 2)
            matches.append(Match(module, tuple(opts)))
        elif word in ("-j", "-g") and i + 1 < len(words):
            if word == "-g":
                raise UnmodelledRule("goto (-g) is not supported")
            target = words[i + 1]
            target_options, i = options(i + 2)
        else:
            raise UnmodelledRule(f"unexpected {word!r}")
    if target is None:
        raise UnmodelledRule("no target")
    return Rule(table, chain, target, matches=tuple(matches), target_options=tuple(target_options),
                **parts)  # type: ignore[arg-type]


_PARSED: dict[tuple[str, str, str], tuple[Rule | None, str]] = {}  # a memo (functools is an import of every start)


def _parsed(table: str, chain: str, spec: str) -> tuple[Rule | None, str]:
    key = (table, chain, spec)
    found = _PARSED.get(key)
    if found is None:
        try:
            found = parse_rule(table, chain, spec), ""
        except UnmodelledRule as exc:
            found = None, str(exc)
        if len(_PARSED) >= 4096:
            _PARSED.clear()
        _PARSED[key] = found
    return found


def parse_save(text: str) -> dict[str, SavedTable]:
    """Parse iptables-save output (with or without `-c` counters)."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):  # `-c` packet counters before a rule
            line = line.split("]", 1)[1].strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable(line[1:]))
        elif line == "COMMIT":
            current = None
        elif current is None:
            raise ValueError(f"line outside a table: {raw!r}")
        elif line.startswith(":"):
            name, policy, *counters = line[1:].split()[:3]
            current.chains[name] = policy
            if counters:
                current.counters[name] = counters[0]
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.rules.append(SavedRule(current.name, chain, rest[0] if rest else ""))
        else:
            raise ValueError(f"unexpected line in iptables-save text: {raw!r}")
    return tables


def normalize(text: str) -> dict[str, list[str]]:
    """Save text reduced to what the round trip compares, per table.

    Comments, counters and built-in chains without rules are dropped; built-in
    chain policies are kept only when they are not ACCEPT. Tables with nothing
    left are dropped, so an empty `*filter` block equals no block.
    """
    result: dict[str, list[str]] = {}
    for name, table in parse_save(text).items():
        used = {rule.chain for rule in table.rules}
        lines = []
        for chain, policy in table.chains.items():
            if is_builtin(name, chain):
                if policy not in ("ACCEPT", "-"):
                    lines.append(f":{chain} {policy}")
            else:
                lines.append(f":{chain} -")
        lines += [f"-A {rule.chain} {rule.spec}".rstrip() for rule in table.rules]
        if lines or used:
            result[name] = lines
    return result


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


def rule_words(spec: str) -> list[str]:
    """Rule text split into its words as iptables-save wrote them, quoted free text (a comment) unquoted."""
    return _quoted_words(spec) if '"' in spec else spec.split()


def _quoted_words(spec: str) -> list[str]:
    """Rule text with quoted free text (a comment) split into words, each quoted one unquoted.

    The inverse of write.quoted: only a word that starts with `"` is quoted
    (an interface name may hold a `'` or `\\` and is printed as it is),
    and inside it a backslash escapes the next character.
    """
    words: list[str] = []
    i, end = 0, len(spec)
    while i < end:
        if spec[i] == " ":
            i += 1
        elif spec[i] == '"':
            i += 1
            chars = []
            while i < end and spec[i] != '"':
                if spec[i] == "\\" and i + 1 < end:
                    i += 1
                chars.append(spec[i])
                i += 1
            if i >= end:
                raise UnmodelledRule("a quote that is not closed")
            words.append("".join(chars))
            i += 1
        else:
            stop = spec.find(" ", i)
            stop = end if stop < 0 else stop
            words.append(spec[i:stop])
            i = stop
    return words


DIVERT_CHAIN = "ISTIO_DIVERT"  # where every rule set sets its TPROXY mark


def divert_marks(specs: Iterable[str]) -> set[int]:
    """The TPROXY marks ISTIO_DIVERT rules (their text after `-A CHAIN`) set: their policy routes are ours.

    iptables-save spells MARK as `--set-xmark VALUE/MASK`; `--set-mark` is read too.
    """
    marks = set()
    for spec in specs:
        words = spec.split()
        for flag in ("--set-xmark", "--set-mark"):
            if flag in words and words.index(flag) + 1 < len(words):
                marks.add(int(words[words.index(flag) + 1].split("/")[0], 0))
    return marks
