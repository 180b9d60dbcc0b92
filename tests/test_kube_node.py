"""The test node itself (tests/kubenode.py): it leaves the host as it found it, even when killed.

A node is started by a separate Python process (its owner), runs a pod, and the owner is killed
with SIGKILL halfway, as a crashed or timed-out test run would be. Everything of the node is
still there then; `scripts/kube-node cleanup` must remove it all: processes (containerd's shims
and the pod's containers included), cgroups, the work directory, and with them the namespaces and
mounts. The host's sysctls the kubelet wants changed and the paths the
kubelet and libcni hard-code are checked before and after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import kubenode
from kubepods import ROOT, client_pod

pytestmark = [pytest.mark.kube, pytest.mark.root]

HOST_PATHS = ("/var/log/pods", "/var/log/containers", "/var/lib/cni", "/var/lib/kubelet", "/run/containerd",
              "/etc/cni/net.d", "/opt/cni/bin", "/var/run/istio-init-cni", "/root/.kube", "/var/run/kubernetes", "/etc/kubernetes")


def host_state() -> dict[str, Any]:
    sysctls = {key: Path("/proc/sys", key).read_text() for key in kubenode.KUBELET_SYSCTLS}
    sysctls["net/ipv4/ip_forward"] = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    # The cgroups a kubelet or containerd makes when not told where: none at the top of any hierarchy.
    strays = sorted(str(d) for h in kubenode.cgroup_hierarchies() for d in h.iterdir()
                    if d.name in ("kubepods", "kubepods.slice", "k8s.io", "kubelet", "kubelet.slice"))
    return {"sysctls": sysctls, "cgroups": strays, "paths": {p: os.path.exists(p) for p in HOST_PATHS},
            "mounts": sorted(line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                             if "istio-init-kube" in line)}


def node_processes(work: Path) -> list[int]:
    """Processes whose command line names the node's work directory."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path("/proc", entry, "cmdline").read_bytes()
            except OSError:
                continue
            if str(work).encode() in cmdline:
                found.append(int(entry))
    return found


OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import kubenode
node = kubenode.start_node(owner=__import__("os").getpid())
print(node.node_id, flush=True)
time.sleep(600)
"""


def test_killed_owner_is_cleaned_up(kube_node: kubenode.Node) -> None:
    # kube_node: only so the test skips with its reason where no node can run.
    before = host_state()
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(ROOT / "tests")], stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        assert owner.stdout is not None
        node_id = owner.stdout.readline().strip()
        assert node_id, "the owner did not start its node"
        node = kubenode.load(node_id)
        node.kubectl("apply", "-f", "-", stdin=json.dumps(client_pod("victim")))
        node.kubectl("wait", "--for=condition=Ready", "pod/victim", "--timeout=120s", timeout=150)
        assert len(node_processes(node.work)) >= 6  # etcd, the control plane, containerd, a shim
        running = node.ctr("tasks", "ls").stdout
        assert running.count("RUNNING") >= 2, running  # the pod's sandbox and its container
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(timeout=30)

    # The owner is gone; its node is not, until the stale cleanup runs.
    assert kubenode.leftovers(node_id)
    cleanup = subprocess.run([str(ROOT / "scripts" / "kube-node"), "cleanup"], capture_output=True, text=True,
                             timeout=120)
    assert cleanup.returncode == 0, cleanup.stderr
    assert f"removed node {node_id}" in cleanup.stderr
    assert kubenode.leftovers(node_id) == []
    # Exited shims may stay zombies for a moment (PID 1 reaps them late): wait for them to go.
    deadline = time.monotonic() + 10
    while node_processes(node.work) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node_processes(node.work) == []
    assert host_state() == before
    assert kubenode.WORK_BASE.is_dir()  # the session's node still works there
    # The session's own node is untouched: its owner (this process) is alive.
    assert kubenode.leftovers(kube_node.node_id)
    assert kube_node.kubectl("get", "--raw", "/readyz").stdout == "ok"
