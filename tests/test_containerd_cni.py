"""The CNI form through a real runtime: Debian's containerd drives the chained host plugin.

One containerd node per module (containerd_node.py: its own network
namespace, mount namespace and work dir; bridge + host-local on
198.51.100.0/24), with `istio-init cni-agent` chaining itself into the node's
CNI configuration exactly as on a cluster node. The tests speak CRI to
containerd (cri.py): RunPodSandbox with a pod's annotations, then read the
sandbox's rules from its pause process's namespace and compare them with
Istio's CNI goldens; the validation container runs in the sandbox as uid
1337 without capabilities. The last tests stop the agent (SIGKILL, then a
fresh one and SIGTERM). The module's teardown checks that nothing is left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

import podnet
from cases_cni import CNI_CASES, CniCase
from cniagent import AgentDirs, build_plugin, primary_plugins
from cnicluster import MESHED, VALIDATION_FLAGS, Cluster, golden_text, validate
from containerd_node import GATEWAY, PAUSE_IMAGE, ContainerdNode, build_pause, missing
from cri import M, RuntimeClient
from istio_golden import canonical
from istio_init.cni_install import PLUGIN_TYPE
from nsutil import Namespace
from ociimage import Layer, image_tar

pytestmark = pytest.mark.root
ROOT = Path(__file__).resolve().parent.parent
VALIDATION_IMAGE = "localhost/istio-init-test-validation:1"
# This checkout's istio-init, run from the read-only mounts of _validation_mounts.
COMMAND = [f"{ROOT}/.venv/bin/python", "-m", "istio_init", *VALIDATION_FLAGS]
PARALLEL = 20


def _validation_image(directory: Path) -> Path:
    """An image of directories only: the validation runs this checkout's istio-init from read-only mounts."""
    layer = Layer(dirs={name: 0o755 for name in ("usr", "etc", "tmp", "root", "work", "proc", "sys", "dev")},
                  links={"bin": "usr/bin", "lib": "usr/lib", "lib64": "usr/lib64", "sbin": "usr/sbin"},
                  files={"etc/passwd": (b"root:x:0:0::/root:/bin/sh\nistio-proxy:x:1337:1337::/tmp:/bin/sh\n", 0o644),
                         "etc/group": (b"root:x:0:\nistio-proxy:x:1337:\n", 0o644)})
    layer.dirs["tmp"] = 0o1777
    return image_tar(VALIDATION_IMAGE, layer, ["/bin/false"], directory / "validation.tar")


def _validation_mounts() -> list[Any]:
    paths = {"/usr", str(ROOT)}
    base = Path(sys.base_prefix).resolve()
    if not str(base).startswith("/usr"):
        paths.add(str(base))
    return [M["Mount"](container_path=p, host_path=p, readonly=True) for p in sorted(paths)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = missing()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("containerd")
    pause = build_pause(work)
    plugin = build_plugin(tmp_path_factory.mktemp("plugin"))
    node = ContainerdNode.start(work / "node", "cni")
    client = RuntimeClient(node.address)
    try:
        node.import_image(image_tar(PAUSE_IMAGE, Layer(files={"pause": (pause.read_bytes(), 0o755)}), ["/pause"],
                                    work / "pause.tar"))
        node.import_image(_validation_image(work))
        dirs = AgentDirs(node.cni_bin, node.conf_dir, work / "agent-run")
        made = Cluster(node, client, plugin, dirs, work / "agent.log")
        made.start_agent()
        yield made
        if made.agent is not None:
            made.agent.stop()
    finally:
        client.close()
        node.stop()
    assert node.leftovers() == []


def test_the_agent_is_chained_exactly_once(cluster: Cluster) -> None:
    assert [p["type"] for p in primary_plugins(cluster.node.conf_dir)] == ["bridge", PLUGIN_TYPE]
    assert cluster.loaded() == ["bridge", PLUGIN_TYPE]


@pytest.mark.parametrize("case", [c for c in CNI_CASES if c.by_annotations_only], ids=lambda c: c.name)
def test_each_istio_cni_golden_through_containerd(case: CniCase, cluster: Cluster, netns: Namespace) -> None:
    want, tables = golden_text(case, netns)
    sandbox, _ = cluster.run(case.name, case.annotations)
    try:
        assert canonical(cluster.save(sandbox), tables) == want
    finally:
        cluster.remove(sandbox)


@pytest.mark.parametrize("tag, namespace, annotations", [
    ("plain", "default", None),
    ("system", "kube-system", MESHED),
    ("noinject", "default", {**MESHED, "sidecar.istio.io/inject": "false"}),
    ("istioinit", "default", {"sidecar.istio.io/status": '{"initContainers":["istio-init"],'
                                                         '"containers":["istio-proxy"]}'}),
])
def test_pods_the_agent_skips_get_nothing(tag: str, namespace: str, annotations: Any, cluster: Cluster) -> None:
    sandbox, _ = cluster.run(tag, annotations, namespace)
    try:
        assert cluster.ours(sandbox) == ""
        address = cluster.client.pod_sandbox_status(sandbox).status.network.ip
        assert address.startswith("198.51.100.") and address in cluster.node.ip_leases()
    finally:
        cluster.remove(sandbox)


def test_a_bad_annotation_fails_runpodsandbox_naming_it(cluster: Cluster) -> None:
    before = {s.id for s in cluster.client.list_pod_sandboxes()}
    leases = cluster.node.ip_leases()
    with pytest.raises(grpc.RpcError) as failed:
        cluster.run("bad", {**MESHED, "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,nonsense"})
    details = failed.value.details()  # type: ignore[attr-defined]
    assert "traffic.sidecar.istio.io/includeOutboundIPRanges" in details and "nonsense" in details
    assert {s.id for s in cluster.client.list_pod_sandboxes()} == before
    assert cluster.node.ip_leases() == leases  # containerd's DEL gave the address back


def test_the_validation_container_passes_only_in_a_captured_sandbox(cluster: Cluster) -> None:
    captured, captured_config = cluster.run("validated", MESHED)
    skipped, skipped_config = cluster.run("unvalidated", None)
    try:
        code, text = validate(cluster, captured, captured_config, VALIDATION_IMAGE, COMMAND, _validation_mounts())
        assert code == 0, text
        code, text = validate(cluster, skipped, skipped_config, VALIDATION_IMAGE, COMMAND, _validation_mounts())
        assert code == 126, text
    finally:
        cluster.remove(captured)
        cluster.remove(skipped)


def test_traffic_through_the_bridge_lands_on_the_capture_ports(cluster: Cluster) -> None:
    sandbox, _ = cluster.run("traffic", MESHED)
    name = f"iin-ctd-{sandbox[:12]}"
    pid = cluster.node.pause_pid(cluster.client, sandbox)
    subprocess.run(["ip", "netns", "attach", name, str(pid)], check=True, timeout=30)
    proxy = None
    try:
        address = cluster.client.pod_sandbox_status(sandbox).status.network.ip
        proxy = podnet.start_server(name, "proxy", tcp=[15001, 15006], uid=1337, gid=1337)
        inbound = podnet.run_client(cluster.node.netns, address, 8080)
        assert (inbound.tag, inbound.listener, inbound.orig) == ("proxy", 15006, (address, 8080))
        outbound = podnet.run_client(name, GATEWAY, 9999, uid=1000, gid=1000)
        assert (outbound.tag, outbound.listener, outbound.orig) == ("proxy", 15001, (GATEWAY, 9999))
    finally:
        if proxy is not None:
            proxy.stop()
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)
        cluster.remove(sandbox)


def test_parallel_sandboxes_all_get_the_rules(cluster: Cluster, netns: Namespace) -> None:
    case = next(c for c in CNI_CASES if c.name == "basic")
    want, tables = golden_text(case, netns)
    configs = [cluster.node.sandbox_config(cluster.name("parallel"), "default", case.annotations)
               for _ in range(PARALLEL)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        sandboxes = list(pool.map(cluster.run_config, configs))
    try:
        for sandbox in sandboxes:
            assert canonical(cluster.save(sandbox), tables) == want
    finally:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(cluster.remove, sandboxes))


def test_with_the_agent_killed_meshed_pods_wait_and_kube_system_starts(cluster: Cluster) -> None:
    assert cluster.agent is not None
    cluster.agent.stop(signal.SIGKILL)
    cluster.agent = None
    assert cluster.loaded() == ["bridge", PLUGIN_TYPE]  # a killed agent cannot unchain itself
    with pytest.raises(grpc.RpcError) as failed:
        cluster.run("orphan", MESHED)
    assert "not reachable" in failed.value.details()  # type: ignore[attr-defined]
    sandbox, _ = cluster.run("system", MESHED, "kube-system")
    try:
        assert cluster.ours(sandbox) == ""
    finally:
        cluster.remove(sandbox)


def test_sigterm_unchains_and_pods_start_without_us(cluster: Cluster) -> None:
    agent = cluster.start_agent()
    assert cluster.loaded() == ["bridge", PLUGIN_TYPE]
    assert agent.stop(signal.SIGTERM) == 0
    cluster.agent = None
    assert [p["type"] for p in primary_plugins(cluster.node.conf_dir)] == ["bridge"]
    assert not (cluster.node.cni_bin / PLUGIN_TYPE).exists()
    cluster.wait_loaded(chained=False)
    sandbox, _ = cluster.run("after", MESHED)
    try:
        assert cluster.ours(sandbox) == ""
    finally:
        cluster.remove(sandbox)
