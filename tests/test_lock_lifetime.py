"""One namespace, one lock, for as long as anyone can hold it (issue 19, finding 4).

The CNI plugin's DEL removes the pod's lock file. It used to unlink it after
releasing the lock, so a run that had opened the old file (and got its lock
after DEL) and a run that created the new file both held "the" lock. Now a
lock file is unlinked only under its own lock, and a run that locked a file
the path no longer names takes the lock of the path's new file instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from istio_init.host import locks
from nsutil import Namespace

# A run that takes the namespace's lock again and again and logs when it holds it (monotonic time).
_LOCKER = """
import os, sys, time
from istio_init.host import locks
log, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
while time.monotonic() < until:
    with locks.namespace_lock(30):
        start = time.monotonic()
        time.sleep(0.02)
        end = time.monotonic()
    with open(log, "a") as out:
        out.write(f"{os.getpid()} {start:.6f} {end:.6f}\\n")
    time.sleep(0.003)
"""


def _holds(log: Path) -> list[tuple[float, float]]:
    return sorted((float(start), float(end)) for _, start, end in (line.split() for line in log.read_text().splitlines()))


@pytest.mark.root
def test_cni_del_never_splits_the_namespace_lock(netns: Namespace, tmp_path: Path) -> None:
    """Two runs locking in a loop while DEL retires the lock file again and again: never two holders at once."""
    env = {**os.environ, "ISTIO_INIT_LOCK_DIR": str(tmp_path / "locks")}
    log = tmp_path / "holds.log"
    lockers = [subprocess.Popen(["nsenter", f"--net={netns.path}", sys.executable, "-c", _LOCKER, str(log), "6"],
                                env=env) for _ in range(3)]
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "istio-init-cni"})
    plugin = str(Path(sys.executable).with_name("istio-init-cni"))
    cni_env = {**env, "CNI_COMMAND": "DEL", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": netns.path}
    answers = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            done = subprocess.run([plugin], input=conf, env=cni_env, capture_output=True, text=True, timeout=60)
            answers.append(done.returncode)
    finally:
        for locker in lockers:
            locker.wait(timeout=60)
    assert answers and set(answers) == {0}, answers
    holds = _holds(log)
    assert len(holds) > 20
    overlaps = [(a, b) for a, b in zip(holds, holds[1:]) if b[0] < a[1]]
    assert overlaps == [], f"{len(overlaps)} of {len(holds)} holds overlapped another: {overlaps[:3]}"


def test_a_lock_taken_on_a_retired_file_moves_to_the_paths_new_file(tmp_path: Path) -> None:
    """The waiter had opened the file before it was retired: it ends up holding the file the path names."""
    path = str(tmp_path / "ns.lock")
    with locks.held(path, 5, "test"):
        waiter = subprocess.Popen([sys.executable, "-c", (
            "import os, sys, time\nfrom istio_init.host import locks\n"
            f"with locks.held({path!r}, 10, 'test'):\n"
            f"    print(os.path.exists({path!r}), flush=True); time.sleep(1)\n")],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # the waiter has opened the file and polls for its lock
        os.unlink(path)  # as retire() does: under the lock
    assert waiter.stdout is not None
    assert waiter.stdout.readline() == "True\n"  # it holds a file the path names, not the unlinked one
    # While the waiter holds the new file, nobody else gets the lock.
    started = time.monotonic()
    with locks.held(path, 10, "test"):
        waited = time.monotonic() - started
    waiter.wait(timeout=10)
    assert waited > 0.3, f"took the lock after {waited:.3f}s while the waiter held it"


def test_retire_waits_for_the_holder_and_removes_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "ns.lock")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom istio_init.host import locks\n"
        f"with locks.held({path!r}, 5, 'test'):\n    print('held', flush=True); time.sleep(0.6)\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    started = time.monotonic()
    locks.retire(path)
    assert time.monotonic() - started > 0.3
    assert not os.path.exists(path)
    holder.wait(timeout=10)
    locks.retire(path)  # nothing there: nothing to do
