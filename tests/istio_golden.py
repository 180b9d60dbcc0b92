"""Reading Istio's capture goldens (see cases_current.py for their layout).

Two readings, both free of our planner: the restore input per family (to load
into a kernel, which gives the canonical text), and, without a kernel, each
chain's final sequence of jump targets (Istio's `-A`/`-I N` applied in order),
a cheap cross-check of rule order that needs no canonical spelling.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from istio_init.iptables_save.write import chain_order, split_families
from istio_init.iptables_save.read import parse_save

if TYPE_CHECKING:
    from nsutil import Namespace


class CaseWithResolvers(Protocol):
    @property
    def env(self) -> dict[str, str]: ...

    def resolv_conf(self) -> str: ...


class GoldenCase(CaseWithResolvers, Protocol):
    """A case with Istio's golden, its kernel-converted text and the args that make it."""

    @property
    def istio_golden(self) -> Path: ...

    @property
    def golden(self) -> Path: ...

    @property
    def ipv6(self) -> bool: ...

    def argv(self, dry_run: bool = True) -> list[str]: ...

_SAVE_COMMANDS = ("iptables-save", "ip6tables-save")
# Per flavour, per family: the restore and save tools that load a golden and read it back.
TOOLS = {
    "legacy": (("iptables-legacy-restore", "iptables-legacy-save"),
               ("ip6tables-legacy-restore", "ip6tables-legacy-save")),
    "nft": (("iptables-nft-restore", "iptables-nft-save"),
            ("ip6tables-nft-restore", "ip6tables-nft-save")),
}
# The flavour of tables each iptables backend writes.
BACKEND_TOOLS = {"libiptc": "legacy", "legacy": "legacy", "nft": "nft"}


def restore_inputs(text: str, group_gids: dict[str, int]) -> tuple[str, str]:
    """(IPv4, IPv6) restore input of a golden; group names replaced by their gids.

    The IPv6 input starts at the first `*table` line whose table the IPv4
    input already had (every family has a nat table).
    """
    families: tuple[list[str], list[str]] = ([], [])
    seen: set[str] = set()
    family = 0
    names = "|".join(map(re.escape, group_gids))
    for line in text.splitlines():
        if line.strip() in _SAVE_COMMANDS:
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            if table in seen:
                family = 1
            seen.add(table)
            line = f"*{table}"
        if names:
            line = re.sub(rf"--gid-owner ({names})\b", lambda m: f"--gid-owner {group_gids[m.group(1)]}", line)
        families[family].append(line)
    return tuple("\n".join(lines) + "\n" if lines else "" for lines in families)  # type: ignore[return-value]


def tables_in_order(restore_text: str) -> list[str]:
    return [line[1:] for line in restore_text.splitlines() if line.startswith("*")]


def canonical(saved: str, tables: list[str]) -> str:
    """iptables-save text in our dry run's layout: `tables` in that order, user chains
    sorted, each chain's rules together with built-in chains first (as iptables_save/write.py)."""
    parsed = parse_save(saved)
    out = []
    for name in tables:
        table = parsed[name]
        out.append(f"*{name}")
        out += [f":{chain} - [0:0]" for chain in sorted(table.user_chains())]
        rules: dict[str, list[str]] = {}
        for chain, spec in ((r.chain, r.spec) for r in table.rules):
            rules.setdefault(chain, []).append(spec)
        for chain in chain_order(name, list(rules)):
            out += [f"-A {chain} {spec}" for spec in rules[chain]]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def final_targets(restore_text: str) -> dict[tuple[str, str], list[str]]:
    """(table, chain) -> the `-j` targets of its rules in final order, from restore input."""
    chains: dict[tuple[str, str], list[str]] = {}
    table = ""
    for line in restore_text.splitlines():
        words = line.split()
        if line.startswith("*"):
            table = line[1:]
        elif words and words[0] == "-A":
            chains.setdefault((table, words[1]), []).append(words[words.index("-j") + 1])
        elif words and words[0] == "-I":
            position = int(words[2]) if words[2].isdigit() else 1
            chains.setdefault((table, words[1]), []).insert(position - 1, words[words.index("-j") + 1])
    return chains


_COMMAND_TOOLS = {"iptables": 0, "ip6tables": 1}


def command_restore_inputs(text: str, group_gids: dict[str, int]) -> tuple[str, str]:
    """(IPv4, IPv6) restore input of a golden in Istio's command-list form (releases up to 1.23).

    Each line is one `iptables -t TABLE OP ...` or `ip6tables -t TABLE OP ...`
    command in creation order; a family's commands are regrouped per table
    (tables in the order first named), which keeps each chain's creation order,
    so restoring the result leaves what running the commands one by one would.
    Lines that are not iptables commands (`iptables-save`, a read) are skipped.
    """
    tables: tuple[dict[str, list[str]], dict[str, list[str]]] = ({}, {})
    names = "|".join(map(re.escape, group_gids))
    for line in text.splitlines():
        words = line.split(" ", 3)
        if len(words) < 4 or words[0] not in _COMMAND_TOOLS or words[1] != "-t":
            continue
        command = words[3]
        if names:
            command = re.sub(rf"--gid-owner ({names})\b", lambda m: f"--gid-owner {group_gids[m.group(1)]}", command)
        tables[_COMMAND_TOOLS[words[0]]].setdefault(words[2], []).append(command)
    return tuple("".join(f"*{table}\n" + "".join(f"{c}\n" for c in commands) + "COMMIT\n"
                         for table, commands in family.items())
                 for family in tables)  # type: ignore[return-value]


def any_restore_inputs(text: str, group_gids: dict[str, int]) -> tuple[str, str]:
    """Either form of Istio's goldens: restore input (1.24 on) or a command list (up to 1.23)."""
    if any(line.startswith(("iptables -t ", "ip6tables -t ")) for line in text.splitlines()):
        return command_restore_inputs(text, group_gids)
    return restore_inputs(text, group_gids)


def resolv_env(case: CaseWithResolvers, directory: Path) -> dict[str, str]:
    """The case's environment plus a resolv.conf of its nameservers (never the host's)."""
    resolv = directory / "resolv.conf"
    resolv.write_text(case.resolv_conf())
    return {**case.env, "ISTIO_INIT_RESOLV_CONF": str(resolv)}


def kernel_converted(ns: Namespace, inputs: tuple[str, str], flavour: str) -> list[str]:
    """Each family's restore input loaded into `ns` with `flavour`'s tools, read back as canonical text."""
    parts = []
    for text, (restore, save) in zip(inputs, TOOLS[flavour]):
        if text:
            ns.run(restore, "--noflush", input=text)
            parts.append(canonical(ns.save(save), tables_in_order(text)))
    return parts


def assert_holds_golden(ns: Namespace, backend: str, golden_text: str) -> None:
    """`ns` holds exactly the golden's tables (and no other table of ours) in the backend's flavour."""
    want = split_families(golden_text)
    for family, (_, save) in enumerate(TOOLS[BACKEND_TOOLS[backend]]):
        saved = ns.save(save)
        used = {name for name, table in parse_save(saved).items() if table.rules or table.user_chains()}
        assert used == set(tables_in_order(want[family]))
        if want[family]:
            assert canonical(saved, tables_in_order(want[family])) == want[family]


def assert_kernel_reads_back_as_stored(ns: Namespace, case: GoldenCase, inputs: tuple[str, str], flavour: str) -> None:
    """Istio's golden (as restore `inputs`) loaded with `flavour`'s tools reads back as the case's stored text.

    UPDATE_GOLDEN=1 rewrites the stored text from the legacy tools' reading.
    """
    parts = kernel_converted(ns, inputs, flavour)
    assert len(parts) == (2 if case.ipv6 else 1)
    converted = "# IPv6\n".join(parts)
    if os.environ.get("UPDATE_GOLDEN") == "1" and flavour == "legacy":
        case.golden.parent.mkdir(parents=True, exist_ok=True)
        case.golden.write_text(converted)
    assert converted == case.golden.read_text()


def assert_real_apply_holds_golden(ns: Namespace, case: GoldenCase, backend: str, directory: Path) -> None:
    """istio-init, applied for real in `ns` with `backend`, leaves exactly the case's stored text."""
    from clirun import clean_environ

    done = ns.run(sys.executable, "-m", "istio_init", *case.argv(dry_run=False), "--iptables-backend", backend,
                  env=clean_environ(resolv_env(case, directory)), check=False)
    assert done.returncode == 0, done.stderr
    assert_holds_golden(ns, backend, case.golden.read_text())
