"""ADD latency of istio-init-cni, measured as the runtime pays it, beside the init container's run.

A chained plugin adds its whole process time to every pod's sandbox set-up,
so that is what is timed: the runtime's exec of istio-init-cni (in a node
namespace, network configuration on stdin, prevResult from the reference
bridge plugin) until it is reaped. Interleaved with it, for comparison: the
bridge plugin's own ADD (the cluster's CNI) and `istio-init` with the same
flags inside a pod (the init container's work, without the container start a
kubelet adds). Every run gets fresh namespaces; the node is tests/cninode.py's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cninode import PLUGIN, CniPod, Node, wait  # noqa: E402

SEED = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
        "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]


def _timed_invoke(node: Node, plugin: Path, command: str, pod: CniPod, conf: dict) -> float:
    start = time.perf_counter()
    done = wait(node.start(plugin, command, pod, conf))
    elapsed = time.perf_counter() - start
    if done.code != 0:
        raise RuntimeError(f"{plugin.name} {command} failed: {done.stdout} {done.stderr}")
    return elapsed


def _summary(name: str, samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return f"{name:44} {statistics.median(ms):8.1f} {min(ms):8.1f} {max(ms):8.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=15, help="runs per side (default 15)")
    opts = parser.parse_args(argv)
    cni, bridge, init = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-cni-") as state:
        node = Node.create(Path(state), tag="bench")
        try:
            for run in range(opts.runs):
                pod = node.add_pod(f"b{run}a")
                cni.append(_timed_invoke(node, PLUGIN, "ADD", pod, node.istio_conf(pod, SEED)))
                start = time.perf_counter()
                other = node.add_pod(f"b{run}c")
                bridge.append(time.perf_counter() - start)
                command = ["nsenter", f"--net={other.path}", str(Path(sys.executable).with_name("istio-init")), *SEED]
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, timeout=60)
                init.append(time.perf_counter() - start)
                node.remove_pod(pod)
                node.remove_pod(other)
        finally:
            node.remove()
    print(f"{'per pod, ' + str(opts.runs) + ' runs':44} {'median':>8} {'min':>8} {'max':>8}  (ms)")
    print(_summary("istio-init-cni ADD (seed flags, whole process)", cni))
    print(_summary("bridge + host-local ADD (the cluster's plugin)", bridge))
    print(_summary("istio-init in the pod (init container's work)", init))
    return 0


if __name__ == "__main__":
    sys.exit(main())
