"""Running nft and istio-init inside a test namespace, for the native nftables tests.

`run_in` enters the test's network namespace and, when files are given, a
private mount namespace in which those files are bind-mounted over their
paths (the resolvers of /etc/resolv.conf, groups in /etc/group): the host's
own files are never touched, and the mounts vanish with the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from typing import TYPE_CHECKING

from clirun import clean_environ
from nft_cases import TEST_GROUPS
from nsutil import Namespace

if TYPE_CHECKING:
    from cases import Case
    from nft_cases import NftCase

# Someone else's table, which every apply, converge and clean must leave as it is.
FOREIGN = """table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 9999 counter accept
	}
}
"""
# A TPROXY run with its own mark and route table: it leaves policy routing and ::6 behind it.
TPROXY_FLAGS = ["-m", "TPROXY", "-b", "*", "-i", "*", "-t", "1338", "-r", "134", "--ipv6", "true",
                "--native-nftables"]


def run_in(ns: Namespace, argv: list[str], stdin: str | None = None, files: dict[str, str] | None = None,
           env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """argv inside `ns`, with `files` (path -> content) mounted over the real ones for that process only."""
    mounts, temps = [], []
    for path, content in (files or {}).items():
        handle = tempfile.NamedTemporaryFile("w", delete=False, prefix="nft-sandbox-")
        handle.write(content)
        handle.close()
        temps.append(handle.name)
        mounts.append(f"mount --bind {handle.name} {path}")
    prefix = ["nsenter", f"--net={ns.path}"]
    if mounts:
        script = " && ".join([*mounts, 'exec "$@"'])
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *prefix]
    try:
        done = subprocess.run([*prefix, *argv], input=stdin, text=True, capture_output=True,
                              env=clean_environ(env), timeout=60)
    finally:
        for name in temps:
            os.unlink(name)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done


FAULT_DRIVER = os.path.join(os.path.dirname(__file__), "faultinject.py")


def istio_init(ns: Namespace, *args: str, files: dict[str, str] | None = None,
               env: dict[str, str] | None = None, check: bool = True,
               fault: str | None = None) -> subprocess.CompletedProcess:
    """The real CLI in `ns` (with `fault`: through tests/faultinject.py, which injects it)."""
    entry = [FAULT_DRIVER, fault] if fault else ["-m", "istio_init"]
    return run_in(ns, [sys.executable, *entry, *args], files=files, env=env, check=check)


def listing(ns: Namespace, files: dict[str, str] | None = None) -> str:
    """The canonical form: `nft -s list ruleset` (no counters, no handles)."""
    return run_in(ns, ["nft", "-s", "list", "ruleset"], files=files).stdout


def load(ns: Namespace, text: str, files: dict[str, str] | None = None) -> None:
    run_in(ns, ["nft", "-f", "-"], stdin=text, files=files)


def group_file(extra: dict[str, int]) -> str:
    """/etc/group with `extra` groups added (names the test needs resolvable)."""
    with open("/etc/group") as handle:
        lines = handle.read().splitlines()
    names = {line.split(":", 1)[0] for line in lines}
    lines += [f"{name}:x:{gid}:" for name, gid in extra.items() if name not in names]
    return "\n".join(lines) + "\n"


def resolv_conf(resolvers: tuple[str, ...]) -> str:
    return "".join(f"nameserver {address}\n" for address in resolvers) or "# no resolvers\n"


def case_files(case: NftCase) -> dict[str, str]:
    """The /etc/group and /etc/resolv.conf an Istio nft golden case was made with."""
    return {"/etc/group": group_file(TEST_GROUPS), "/etc/resolv.conf": resolv_conf(case.resolvers)}


def args_18(case: Case) -> list[str]:
    return [a for a in case.args if a != "istio-iptables"] + ["--ipv6", "true" if case.ipv6 else "false",
                                                                "--native-nftables"]
