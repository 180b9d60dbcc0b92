"""Backend switches, the lock per namespace and failures that changed nothing (root; issue 12 findings 4, 6, 8).

- Finding 4: a run whose backend differs from the one holding istio-init's
  rules removes the old rules (after the new ones are in), so two rule sets
  never capture at once; two concurrent applies with different backends end
  with one rule set.
- Finding 6: a failure before anything changed is not reported as an
  incomplete rollback.
- Finding 8: istio-init's lock is one file per network namespace that a
  process with NET_ADMIN but without root can take.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cases import SEED_ARGS
from clirun import clean_environ
from istio_init.backends.iptables.savefile import normalize
from nsutil import Namespace
from appliedns import expected, istio_init, save, snapshot

pytestmark = pytest.mark.root


def _ours(text: str) -> bool:
    return "ISTIO_" in text


def test_switching_to_nft_removes_the_legacy_rules(netns: Namespace) -> None:
    """Finding 4: seed via auto (legacy), an iptables-nft rule appears, a re-run with -p 15099 goes to nft."""
    first = istio_init(netns, *SEED_ARGS, "--ipv6", "false")
    assert "iptables backend legacy" in first.stderr
    netns.run("iptables-nft", "-A", "INPUT", "-p", "udp", "--dport", "9", "-j", "DROP")

    args = [*SEED_ARGS, "-p", "15099", "--ipv6", "false"]
    second = istio_init(netns, *args)
    assert "iptables backend nft" in second.stderr
    assert "removed istio-init's rules from the legacy tables" in second.stderr
    assert not _ours(save(netns, "legacy", 4))  # no second rule set redirecting to 15001
    nft = normalize(save(netns, "nft", 4))
    assert nft["filter"] == ["-A INPUT -p udp -m udp --dport 9 -j DROP"]
    assert {t: lines for t, lines in nft.items() if t != "filter"} == expected(args[1:-2], False)[0]


@pytest.mark.parametrize("order", ["legacy-first", "nft-first"])
def test_concurrent_applies_with_different_backends_end_in_one_rule_set(netns: Namespace, order: str) -> None:
    flags = {"legacy": ["-i", "*", "-b", "*"], "nft": ["-i", "10.0.0.0/8", "-b", "80"]}
    names = ["legacy", "nft"] if order == "legacy-first" else ["nft", "legacy"]
    procs = [subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-m", "istio_init", *flags[name],
                               "--ipv6", "false", "--iptables-backend", name], env=clean_environ(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in names]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    legacy, nft = normalize(save(netns, "legacy", 4)), normalize(save(netns, "nft", 4))
    holders = [name for name, state in (("legacy", legacy), ("nft", nft)) if state]
    assert len(holders) == 1, (legacy, nft)
    state = legacy or nft
    assert state == expected(flags[holders[0]], False)[0]


def test_failure_before_any_change_is_not_an_incomplete_rollback(netns: Namespace, tmp_path: Path) -> None:
    """Finding 6: the xtables lock on a read-only file system; nothing was applied, and the message says so."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    before = snapshot(netns, "legacy")
    script = (f"mount -t tmpfs -o ro none {readonly} && exec nsenter --net={netns.path} "
              f"{sys.executable} -m istio_init -i '*' -b '*' --ipv6 false --iptables-backend legacy")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          env=clean_environ({"XTABLES_LOCKFILE": str(readonly / "xtables.lock")}),
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert "rollback incomplete" not in message and "nothing had been changed" in message, message
    assert snapshot(netns, "legacy") == before


def _lock_path(ns: Namespace, env: dict[str, str]) -> str:
    code = "from istio_init.host import locks; print(locks.namespace_lock_path())"
    return ns.run(sys.executable, "-c", code, env=clean_environ(env)).stdout.strip()


def test_one_lock_per_namespace_and_usable_without_root(netns: Namespace) -> None:
    """Finding 8: two namespaces, two lock files; a uid-1337 process with no capabilities can take them."""
    top = tempfile.mkdtemp(prefix="iit-locks-")  # pytest's tmp_path is root-only; uid 1337 must reach this
    os.chmod(top, 0o755)
    env = {"ISTIO_INIT_LOCK_DIR": os.path.join(top, "locks")}
    other = Namespace.create()
    try:
        path_a, path_b = _lock_path(netns, env), _lock_path(other, env)
        assert path_a != path_b and os.path.dirname(path_a) == env["ISTIO_INIT_LOCK_DIR"]
        istio_init(netns, "-i", "*", "--ipv6", "false", env=env)  # root makes the directory and the file
        assert os.stat(env["ISTIO_INIT_LOCK_DIR"]).st_mode & 0o7777 == 0o1777
        assert os.stat(path_a).st_mode & 0o777 == 0o644
        take = ("import os; from istio_init.host import locks; os.setgroups([]); os.setgid(1337); os.setuid(1337)\n"
                "with locks.namespace_lock(5): print('locked')")
        for ns in (netns, other):  # the file exists (made by root) / does not exist yet
            done = ns.run(sys.executable, "-c", take, env=clean_environ(env), check=False)
            assert done.stdout.strip() == "locked", done.stderr
    finally:
        other.remove()
        shutil.rmtree(top)


def test_applies_in_two_namespaces_do_not_wait_for_each_other(netns: Namespace, tmp_path: Path) -> None:
    env = {"ISTIO_INIT_LOCK_DIR": str(tmp_path / "locks")}
    other = Namespace.create()
    try:
        held_path = _lock_path(netns, env)
        os.makedirs(os.path.dirname(held_path), exist_ok=True)
        fd = os.open(held_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Another namespace: not blocked by this namespace's lock.
            done = other.run(sys.executable, "-m", "istio_init", "-i", "*", "--ipv6", "false",
                             env=clean_environ(env), timeout=30)
            assert done.returncode == 0 and _ours(save(other, "legacy", 4))
            # The same namespace: waits for the lock.
            proc = subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-m", "istio_init", "-i", "*",
                                     "--ipv6", "false"], env=clean_environ(env), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
            assert proc.poll() is None and not _ours(save(netns, "legacy", 4))
        finally:
            os.close(fd)
        proc.communicate(timeout=60)
        assert proc.returncode == 0 and _ours(save(netns, "legacy", 4))
    finally:
        other.remove()
