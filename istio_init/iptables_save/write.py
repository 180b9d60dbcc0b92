"""A plan as `iptables-save` text, exactly as the kernel prints it back.

Canonical form matters because the test suite's round trip compares this text
with what `iptables-save` shows after an apply: user chains are listed sorted,
rules are grouped by chain (built-in chains first, in the kernel's order), and
each rule spells its parts in iptables-save's order. Built-in chain headers
are left out so the text can be fed to `iptables-restore --noflush`. read.py
is the inverse.
"""

from __future__ import annotations

from istio_init.model import BUILTIN_CHAINS, FamilyPlan, Option, Rule, RulePlan, is_builtin
from istio_init.records import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Iterable, Mapping, Sequence

    from istio_init.iptables_save.read import SavedTable

IPV6_MARKER = "# IPv6"
# Options whose free text iptables-save prints quoted unless it is all [A-Za-z0-9_-] (xtables_save_string).
QUOTED_OPTIONS = frozenset({"comment", "nflog-prefix", "log-prefix"})
_BARE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def quoted(value: str) -> str:
    """Free text as iptables-save prints it: bare when plain, else in double quotes, `"`, `'` and `\\` escaped."""
    if value and _BARE.issuperset(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'") + '"'


def _options(options: tuple[Option, ...]) -> list[str]:
    words: list[str] = []
    for opt in options:
        if opt.negated:
            words.append("!")
        words.append(f"--{opt.name}")
        if opt.value:
            words.append(quoted(opt.value) if opt.name in QUOTED_OPTIONS else opt.value)
    return words


def rule_spec(rule: Rule) -> str:
    """The rule's parameters after `-A CHAIN`, in iptables-save's order.

    Not cached: an apply spells each planned rule once (reconcile keeps the
    spellings for the restore text and the printed tables), and hashing a Rule
    for a cache costs about what spelling one does: an -x rule is one unpacking
    and one f-string.
    """
    _, _, target, source, destination, negated, in_interface, out_interface, protocol, matches, target_options = rule
    if not (source or negated or in_interface or out_interface or protocol or matches or target_options):
        return f"-d {destination} -j {target}" if destination else f"-j {target}"  # each -x rule
    words: list[str] = []
    if source:
        words.append(f"-s {source}")
    if destination:
        words.append(f"! -d {destination}" if negated else f"-d {destination}")
    if in_interface:
        words.append(f"-i {in_interface}")
    if out_interface:
        words.append(f"-o {out_interface}")
    if protocol:
        words.append(f"-p {protocol}")
    for match in matches:
        words.append(f"-m {match.module}")
        words += _options(match.options)
    words.append(f"-j {target}")
    if target_options:
        words += _options(target_options)
    return " ".join(words)


def chain_order(table: str, chains: list[str]) -> list[str]:
    """iptables-save's chain order: built-ins in kernel order, then the rest sorted."""
    builtins = [c for c in BUILTIN_CHAINS.get(table, ()) if c in chains]
    return builtins + sorted(c for c in chains if not is_builtin(table, c))


def render_table(family: FamilyPlan, table: str) -> str:
    final = family.final_rules(table)
    lines = [f"*{table}"]
    lines += [f":{chain} - [0:0]" for chain in sorted(family.chains(table))]
    for chain in chain_order(table, list(final)):
        if final[chain]:  # one join per chain: an -x list puts 8,000 rules in ISTIO_OUTPUT
            prefix = f"-A {chain} "
            lines.append(prefix + f"\n{prefix}".join(map(rule_spec, final[chain])))
    lines.append("COMMIT\n")  # the last newline, without copying the whole text to add it
    return "\n".join(lines)


def table_text(name: str, builtins: Iterable[tuple[str, str, str]], user_chains: Iterable[str],
               rules: Mapping[str, Sequence[str]]) -> str:
    """One `*table ... COMMIT` block as iptables-save prints it.

    `builtins` are (chain, policy, `[packets:bytes]`) in the kernel's order,
    `user_chains` sorted, `rules` each chain's rule texts (after `-A CHAIN`).
    """
    builtins = list(builtins)
    user = list(user_chains)
    lines = [f"*{name}"]
    lines += [f":{chain} {policy} {counters}" for chain, policy, counters in builtins]
    lines += [f":{chain} - [0:0]" for chain in user]
    for chain in (*(chain for chain, _, _ in builtins), *user):
        if rules.get(chain):  # one join per chain: an -x list puts 8,000 rules in ISTIO_OUTPUT
            prefix = f"-A {chain} "
            lines.append(prefix + f"\n{prefix}".join(rules[chain]))
    lines.append("COMMIT\n")  # the text's last newline, without copying the whole text to add it
    return "\n".join(lines)


def saved_text(tables: Mapping[str, SavedTable]) -> str:
    """Parsed tables (read.parse_save) printed again: iptables-save's text for them, comments aside."""
    blocks = []
    for name, table in tables.items():
        builtins = [(chain, table.chains[chain], table.counters.get(chain, "[0:0]"))
                    for chain in BUILTIN_CHAINS.get(name, ()) if chain in table.chains]
        rules: dict[str, list[str]] = {}
        for rule in table.rules:
            rules.setdefault(rule.chain, []).append(rule.spec)
        blocks.append(table_text(name, builtins, sorted(table.user_chains()), rules))
    return "".join(blocks)


def render_family(family: FamilyPlan) -> str:
    return "".join(render_table(family, table) for table in family.tables())


def render_plan(plan: RulePlan) -> str:
    """The dry-run text: IPv4 tables, then `# IPv6` and the IPv6 tables if any."""
    text = render_family(plan.ipv4)
    if plan.ipv6 is not None:
        text += IPV6_MARKER + "\n" + render_family(plan.ipv6)
    return text


def split_families(text: str) -> tuple[str, str]:
    """Split dry-run text at the `# IPv6` line into (IPv4 part, IPv6 part)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == IPV6_MARKER:
            return "".join(lines[:i]), "".join(lines[i + 1:])
    return text, ""
