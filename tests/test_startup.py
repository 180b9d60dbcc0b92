"""Start-up budget guards, per path: the modules each common path may not import (not timings).

An init container delays every pod start, and in Python imports are where
start-up time goes: python-iptables costs 230-400 ms through its slow paths,
all of pyroute2 150-300 ms, setuptools' distutils shim over 100 ms, and even
the standard library's `typing`, `re`, `enum`, `functools`, `collections` and
`contextlib` together 5-10 ms, about half of what istio-init adds to the
interpreter's own start (docs/performance.md). These tests read `-X
importtime` of real istio-init processes, started as the installed command
starts them (bin/istio-init, not `python -m`, whose runpy imports
contextlib and importlib.util itself), so they fail the moment a change pulls
one of them onto a path that must not have it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cases import SEED_ARGS
from clirun import clean_environ

COMMAND = Path(__file__).resolve().parent.parent / "bin" / "istio-init"
# The standard library modules no common path imports (what imports them costs every pod start).
STDLIB_NOT_NEEDED = {"typing", "re", "enum", "functools", "collections", "contextlib", "json", "pathlib", "urllib",
                     "dataclasses", "subprocess", "shlex", "socket", "logging", "asyncio", "importlib.util", "inspect"}
# C extension modules (shared libraries, each a dlopen of every start) no common path needs: host/netlink.py
# packs its headers with int.to_bytes.
EXTENSIONS_NOT_NEEDED = {"struct", "_struct"}
# istio-init's modules a path needs only when a flag is given: ifnames.py checks -k/-c interface names.
ONLY_FOR_GIVEN_FLAGS = {"istio_init.ifnames"}
SLOW_FOR_DRY_RUN = ("iptc", "pyroute2", "distutils", "setuptools", "pkg_resources", "click", "subprocess",
                    "dataclasses", "socket", "ipaddress", "shlex", *sorted(STDLIB_NOT_NEEDED),
                    *sorted(EXTENSIONS_NOT_NEEDED), *sorted(ONLY_FOR_GIVEN_FLAGS))
# What no apply imports: click (entry.py parses Istio's flags), pyroute2 (istio_init's netlink is its own,
# istio_init/host/netlink.py; pyroute2 is the tests' oracle), setuptools (python-iptables' distutils import is
# turned into its sysconfig fallback).
NEVER_ON_AN_APPLY = {"click", "pyroute2", "setuptools", "pkg_resources"} | STDLIB_NOT_NEEDED | EXTENSIONS_NOT_NEEDED \
    | ONLY_FOR_GIVEN_FLAGS


def _without_site() -> tuple[list[str], dict[str, str]]:
    """The interpreter flags and environment that start istio-init with nothing imported for it beforehand.

    `site` (with a development venv's editable install, its import hook) already
    imports re, contextlib, functools, pathlib, ipaddress and more, which would
    hide those modules from every check here: so `site` is skipped and the
    package and its dependencies are found through PYTHONPATH instead.
    """
    env = clean_environ({"PYTHONPATH": os.pathsep.join([str(COMMAND.parent.parent), sysconfig.get_paths()["purelib"]])})
    return ["-S", "-X", "importtime"], env


def _importtime_names(stderr: str) -> set[str]:
    names: set[str] = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            full = line.rsplit("|", 1)[1].strip()
            names |= {full, full.split(".")[0]}
    return names


def imported_modules(argv: list[str], netns=None) -> set[str]:
    """Top-level and full names of every module a real istio-init process imported beyond the bare interpreter's."""
    flags, env = _without_site()
    bare = subprocess.run([sys.executable, *flags, "-c", "pass"], capture_output=True, text=True, env=env, timeout=60)
    command = [sys.executable, *flags, str(COMMAND), *argv]
    if netns is not None:
        command = ["nsenter", f"--net={netns.path}", *command]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    names = _importtime_names(done.stderr) - _importtime_names(bare.stderr)
    assert "istio_init.config" in names  # the importtime output was read at all
    return names


# What a dry run of the default (1.8) rule set never uses: the System (it touches no kernel), the
# other rule sets and the apply path's modules.
NOT_ON_A_DRY_RUN = {"istio_init.system", "istio_init.rulesets.current", "istio_init.rulesets.istio_1_9_to_1_24",
                    "istio_init.apply", "istio_init.backends", "istio_init.host"}


def test_dry_run_imports_nothing_slow() -> None:
    names = imported_modules([*SEED_ARGS, "-n"])
    assert not names & set(SLOW_FOR_DRY_RUN), sorted(names & set(SLOW_FOR_DRY_RUN))


def test_dry_run_with_its_families_given_imports_nothing_of_the_kernel() -> None:
    """With --ipv6 given nothing asks the kernel (without it, netns reads the pod's addresses)."""
    names = imported_modules([*SEED_ARGS, "-n", "--ipv6", "false"])
    assert not names & NOT_ON_A_DRY_RUN, sorted(names & NOT_ON_A_DRY_RUN)
    assert "istio_init.rulesets.istio_1_8" in names


def test_dry_run_of_the_current_rule_set_loads_it() -> None:
    """The guard above can fail: the current rule set's module is imported when it is asked for."""
    names = imported_modules([*SEED_ARGS, "-n", "--ipv6", "false", "--rules-version", "current"])
    assert "istio_init.rulesets.current" in names and "istio_init.rulesets.istio_1_9_to_1_24" not in names


def test_interface_names_given_load_their_checks() -> None:
    """The guards above can fail: -k's names are checked by ifnames.py, imported when names are given."""
    assert "istio_init.ifnames" in imported_modules([*SEED_ARGS, "-n", "--ipv6", "false", "-k", "eth1"])


def test_dry_run_with_ipv6_and_tproxy_imports_nothing_slow() -> None:
    names = imported_modules([*SEED_ARGS, "-m", "TPROXY", "--redirect-dns", "-n", "--ipv6", "true"])
    assert not names & set(SLOW_FOR_DRY_RUN)


@pytest.mark.root
def test_common_apply_imports_no_pyroute2_and_no_setuptools(netns) -> None:
    """An IPv4 pod in REDIRECT mode with the default backend: the legacy restore tool, no python-iptables."""
    names = imported_modules([*SEED_ARGS, "--iptables-backend", "auto"], netns)
    assert "istio_init.backends.iptables.restore" in names  # the restore path really ran
    # shlex only splits quoted rules (a comment) read back from the kernel; a fresh namespace has none.
    unneeded = NEVER_ON_AN_APPLY | {"iptc", "ctypes", "subprocess", "dataclasses", "shlex"}
    assert not names & unneeded, sorted(names & unneeded)


@pytest.mark.root
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_restore_backend_applies_import_no_python_iptables(netns, backend: str) -> None:
    """The restore tools do the work: python-iptables (and libiptc's module) would be start-up for nothing."""
    names = imported_modules([*SEED_ARGS, "--iptables-backend", backend], netns)
    assert "istio_init.backends.iptables.restore" in names  # the restore path really ran
    # subprocess too: spawn.py runs the tools (python-iptables imports subprocess itself, so libiptc has it).
    unneeded = NEVER_ON_AN_APPLY | {"iptc", "istio_init.backends.iptables.libiptc", "ctypes", "subprocess",
                                    "dataclasses"}
    assert not names & unneeded, sorted(names & unneeded)


@pytest.mark.root
def test_large_auto_apply_imports_no_python_iptables(netns) -> None:
    """auto sends a 1,000-CIDR plan to iptables-legacy-restore: nothing of libiptc's path is imported."""
    cidrs = ",".join(f"10.{i // 250}.{i % 250}.0/24" for i in range(1000))
    names = imported_modules([*SEED_ARGS, "-x", cidrs, "--iptables-backend", "auto"], netns)
    assert "istio_init.backends.iptables.restore" in names
    assert not names & (NEVER_ON_AN_APPLY | {"iptc", "ctypes", "subprocess", "dataclasses"})


@pytest.mark.root
def test_tproxy_apply_imports_no_pyroute2_and_no_socket(netns) -> None:
    """TPROXY's policy rule and route go over istio-init's own netlink (host/netlink.py on `_socket`)."""
    names = imported_modules([*SEED_ARGS, "-m", "TPROXY", "--iptables-backend", "auto"], netns)
    assert {"istio_init.host.routing", "istio_init.host.netlink"} <= names  # the routing path really ran
    unneeded = NEVER_ON_AN_APPLY | {"iptc", "ctypes", "subprocess", "dataclasses", "shlex", "ipaddress"}
    assert not names & unneeded, sorted(names & unneeded)


@pytest.mark.root
def test_ipv6_apply_imports_no_pyroute2_and_no_socket(netns) -> None:
    """An IPv6 pod: both families through the restore tools, and ::6 on lo over istio-init's own netlink."""
    netns.add_address("2001:db8::10/64")
    names = imported_modules([*SEED_ARGS, "--iptables-backend", "auto"], netns)
    assert "istio_init.host.addresses" in names and "istio_init.backends.iptables.restore" in names
    assert "::6/128" in netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout  # the address path really ran
    unneeded = NEVER_ON_AN_APPLY | {"iptc", "ctypes", "subprocess", "dataclasses", "shlex", "ipaddress"}
    assert not names & unneeded, sorted(names & unneeded)


@pytest.mark.root
def test_check_in_sync_imports_no_click_and_nothing_slow(netns) -> None:
    """`check` is an exec probe: entry.py runs it, with what the apply path has and the comparison."""
    args = [arg for arg in SEED_ARGS if arg != "istio-iptables"]
    imported_modules([*args, "--iptables-backend", "auto"], netns)
    names = imported_modules(["check", *args, "--iptables-backend", "auto"], netns)
    assert "istio_init.check" in names
    # check reads the tables through the System: no backend (nor its printed tables) is built to read them.
    # Nor every rule set to learn whose chains it sees (rulesets.OWNED_BY_ANY_RULE_SET).
    unneeded = NEVER_ON_AN_APPLY | {"iptc", "ctypes", "istio_init.backends.iptables.backend",
                                    "istio_init.backends.iptables.committed", "istio_init.apply",
                                    "istio_init.rulesets.istio_1_9_to_1_24", "istio_init.rulesets.current"}
    assert not names & unneeded, sorted(names & unneeded)


@pytest.mark.root
def test_a_pod_with_an_address_imports_nothing_slow(netns) -> None:
    """The pod's IP families come from its addresses (IPv4 here): read without pyroute2 or ipaddress."""
    netns.add_address("192.0.2.10/24")
    names = imported_modules([*SEED_ARGS, "--iptables-backend", "auto"], netns)
    assert "istio_init.host.addresses" in names
    assert not names & (NEVER_ON_AN_APPLY | {"iptc", "ctypes", "ipaddress"}), sorted(names & NEVER_ON_AN_APPLY)


@pytest.mark.root
def test_libiptc_apply_does_import_python_iptables(netns) -> None:
    """The restore-backend guard above can fail: the libiptc backend imports iptc."""
    names = imported_modules([*SEED_ARGS, "--iptables-backend", "libiptc"], netns)
    assert "iptc" in names and "istio_init.backends.iptables.libiptc" in names


def test_iptc_import_leaves_ctypes_util_as_it_was() -> None:
    """The fast import swaps ctypes.util and setuptools' shim only while importing iptc."""
    code = ("import sys, ctypes; from istio_init.backends.iptables.libiptc import _import_iptc; "
            "had = 'ctypes.util' in sys.modules; iptc = _import_iptc(); "
            "assert ('ctypes.util' in sys.modules) == had; "
            "import ctypes.util; assert ctypes.util.find_library.__module__ == 'ctypes.util'; "
            "assert iptc.Table and iptc.Table6; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_auto_sends_plans_to_the_legacy_restore_tool() -> None:
    """Starting iptables-legacy-restore is cheaper than importing python-iptables (docs/performance.md)."""
    from fakehost import FakeHost
    from istio_init import backends, system

    with system.using(FakeHost()):
        assert backends.choose("auto", [4]).name == "legacy"
        assert backends.choose("libiptc", [4]).name == "libiptc"
    with system.using(FakeHost({("nft", 4): "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"})):
        assert backends.choose("auto", [4]).name == "nft"


def test_address_filter_agrees_with_ipaddress() -> None:
    """host/addresses.py reads the pod's address family without ipaddress; its loopback/link-local test must agree."""
    import ipaddress
    import random

    from istio_init.host.addresses import _is_loopback_or_link_local

    rng = random.Random(3)
    samples = [bytes([127, 0, 0, 1]), bytes([169, 254, 1, 1]), bytes([169, 253, 1, 1]), bytes(15) + b"\x01",
               bytes([0xFE, 0x80]) + bytes(14), bytes([0xFE, 0xBF]) + bytes(14), bytes([0xFE, 0xC0]) + bytes(14),
               bytes(16), bytes(4)]
    samples += [bytes(rng.randrange(256) for _ in range(rng.choice([4, 16]))) for _ in range(2000)]
    samples += [bytes([rng.choice([127, 169, 0xFE])]) + bytes(rng.randrange(256) for _ in range(3)) for _ in range(500)]
    for raw in samples:
        address = ipaddress.ip_address(raw)
        assert _is_loopback_or_link_local(raw) == (address.is_loopback or address.is_link_local), address
