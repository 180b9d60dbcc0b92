"""Reading `iptables-save` text back into data.

The live state of a namespace is read as iptables-save text (cheap, and the
same for the legacy and nft tools), and everything that compares or reconciles
works on this parsed form, so idempotency is decided by pure functions over
text, without the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from istio_init.model import is_builtin


@dataclass
class SavedTable:
    """One `*table` block: chain policies (built-ins) or '-' (user chains), and rules."""

    name: str
    chains: dict[str, str] = field(default_factory=dict)  # chain -> policy or '-'
    rules: list[tuple[str, str]] = field(default_factory=list)  # (chain, spec after -A CHAIN)

    def chain_rules(self, chain: str) -> list[str]:
        return [spec for c, spec in self.rules if c == chain]

    def user_chains(self) -> list[str]:
        return [c for c in self.chains if not is_builtin(self.name, c)]


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
            name, policy = line[1:].split()[:2]
            current.chains[name] = policy
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            current.rules.append((chain, rest[0] if rest else ""))
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
        used = {chain for chain, _ in table.rules}
        lines = []
        for chain, policy in table.chains.items():
            if is_builtin(name, chain):
                if policy not in ("ACCEPT", "-"):
                    lines.append(f":{chain} {policy}")
            else:
                lines.append(f":{chain} -")
        lines += [f"-A {chain} {spec}".rstrip() for chain, spec in table.rules]
        if lines or used:
            result[name] = lines
    return result
