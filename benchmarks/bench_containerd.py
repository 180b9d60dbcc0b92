"""What the CNI form adds to a pod start: containerd's RunPodSandbox with the agent chained, and without.

The kubelet's RunPodSandbox is where a chained plugin's time is paid (the
sandbox is not ready until every plugin of the chain has answered). One
containerd node (tests/containerd_node.py), the same meshed pod annotations
on both sides; the agent is chained for one block of runs and stopped
(SIGTERM: unchained) for the next, in alternating blocks so that machine
noise reaches both sides alike. Each sandbox is stopped and removed before
the next; the first run of each block is a warm-up and not counted.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cniagent import AgentDirs, build_plugin  # noqa: E402
from cnicluster import MESHED, Cluster  # noqa: E402
from containerd_node import PAUSE_IMAGE, ContainerdNode, build_pause, missing  # noqa: E402
from cri import RuntimeClient  # noqa: E402
from ociimage import Layer, image_tar  # noqa: E402

BLOCK = 5


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_pod_sandbox(runs: int) -> tuple[list[float], list[float], int] | str:
    """(seconds with the agent chained, seconds without, the agent's peak RSS in KiB), or why not."""
    reason = missing()
    if reason:
        return reason
    chained: list[float] = []
    plain: list[float] = []
    peak = 0
    with tempfile.TemporaryDirectory(prefix="bench-containerd-") as state:
        work = Path(state)
        node = ContainerdNode.start(work / "node", "bench")
        client = RuntimeClient(node.address)
        cluster: Cluster | None = None
        try:
            pause = build_pause(work)
            node.import_image(image_tar(PAUSE_IMAGE, Layer(files={"pause": (pause.read_bytes(), 0o755)}),
                                        ["/pause"], work / "pause.tar"))
            cluster = Cluster(node, client, build_plugin(work), AgentDirs(node.cni_bin, node.conf_dir, work / "run"),
                              work / "agent.log")
            while len(chained) < runs or len(plain) < runs:
                for with_agent, samples in ((True, chained), (False, plain)):
                    if with_agent:
                        agent = cluster.start_agent()
                    for run in range(BLOCK + 1):
                        start = time.perf_counter()
                        sandbox, _ = cluster.run("bench", MESHED)
                        elapsed = time.perf_counter() - start
                        if with_agent and run == BLOCK:
                            assert cluster.ours(sandbox), "the chained agent did not capture the pod"
                        cluster.remove(sandbox)
                        if run:
                            samples.append(elapsed)
                    if with_agent:
                        peak = max(peak, peak_rss_kib(agent.process.pid))
                        agent.stop()
                        cluster.agent = None
                        cluster.wait_loaded(chained=False)
        finally:
            if cluster is not None and cluster.agent is not None:
                cluster.agent.stop()
            client.close()
            node.stop()
    return chained[:runs], plain[:runs], peak


if __name__ == "__main__":
    result = run_pod_sandbox(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
    if isinstance(result, str):
        print(f"skipped: {result}")
    else:
        with_agent, without, rss = result
        print(f"RunPodSandbox median: chained {statistics.median(with_agent) * 1000:.1f} ms, "
              f"without {statistics.median(without) * 1000:.1f} ms, agent peak RSS {rss / 1024:.1f} MiB")
