"""The CNI form from the image, as the DaemonSet runs it, against a containerd node.

The agent runs in a container of the project's image with exactly the
DaemonSet's arguments, environment (its ConfigMap), capabilities and
hostPath mounts (container/kubernetes/cni/daemonset.yaml, read here), except
that the hostPaths are the containerd node's own directories of the test and
the health port is a free one. The node's containerd then starts a meshed
sandbox (Istio's basic CNI golden), an unmeshed one, and runs the image's
validation container in each as the pods' `istio-validation` init container
does (uid 1337, no capabilities). `docker stop` (SIGTERM) must leave the node's
CNI configuration and bin dir as they were. Needs a Docker engine and the
image (scripts/ci-docker); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from cases_cni import CNI_CASES
from cniagent import AgentDirs, free_port, primary_plugins
from cnicluster import MESHED, VALIDATION_FLAGS, Cluster, golden_text, validate
from containerd_node import PAUSE_IMAGE, ContainerdNode, build_pause, missing
from cri import RuntimeClient
from istio_golden import canonical
from istio_init.cni_install import PLUGIN_TYPE
from nsutil import Namespace
from ociimage import Layer, image_tar
from dockerpod import IMAGE, docker

pytestmark = [pytest.mark.docker, pytest.mark.root]
MANIFEST = Path(__file__).resolve().parent.parent / "container" / "kubernetes" / "cni" / "daemonset.yaml"


def _problem() -> str | None:
    try:
        if docker("info", "--format", "{{.ServerVersion}}", timeout=15, check=False).returncode != 0:
            return "no Docker engine answers; start one: scripts/docker-engine start"
    except (subprocess.TimeoutExpired, FileNotFoundError):
        return "no Docker engine answers; start one: scripts/docker-engine start"
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        return f"image {IMAGE} is missing (ISTIO_INIT_IMAGE); build it: scripts/build-image"
    return missing()


def daemonset_run_args(host_paths: dict[str, Path], health_port: int) -> list[str]:
    """`docker run` arguments that reproduce the DaemonSet's pod on this machine."""
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    config = next(d for d in documents if d["kind"] == "ConfigMap")["data"]
    spec = next(d for d in documents if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    container = spec["containers"][0]
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    args = [a.replace("$(EXCLUDE_NAMESPACES)", config["EXCLUDE_NAMESPACES"]) for a in container["args"]]
    args[args.index("--health-port") + 1] = str(health_port)
    run = ["--network", "host" if spec["hostNetwork"] else "bridge",
           "--user", str(container["securityContext"]["runAsUser"])]
    run += [f"--cap-drop={c}" for c in container["securityContext"]["capabilities"]["drop"]]
    run += [f"--cap-add={c}" for c in container["securityContext"]["capabilities"]["add"]]
    run += [item for name, value in config.items() for item in ("-e", f"{name}={value}")]
    for mount in container["volumeMounts"]:
        source = host_paths[volumes[mount["name"]]]
        target = mount["mountPath"]
        if "--run-dir" in args and args[args.index("--run-dir") + 1] == target:
            # The run dir is the same path on the node and in the container: here, the test's.
            target = str(source)
            args[args.index("--run-dir") + 1] = target
        run += ["-v", f"{source}:{target}"]
    return [*run, IMAGE, *args]


@pytest.fixture
def cluster(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    problem = _problem()
    if problem:
        pytest.skip(problem)
    work = tmp_path / "w"
    work.mkdir()
    pause = build_pause(work)
    node = ContainerdNode.start(work / "node", "image")
    client = RuntimeClient(node.address)
    try:
        node.import_image(image_tar(PAUSE_IMAGE, Layer(files={"pause": (pause.read_bytes(), 0o755)}), ["/pause"],
                                    work / "pause.tar"))
        saved = work / "image.tar"
        subprocess.run(["docker", "save", "-o", str(saved), IMAGE], check=True, timeout=300, capture_output=True)
        node.import_image(saved)
        yield Cluster(node, client, Path("/nonexistent"), AgentDirs(node.cni_bin, node.conf_dir, work / "run"),
                      work / "agent.log")
    finally:
        client.close()
        node.stop()
    assert node.leftovers() == []


def _wait_ready(port: int, name: str, timeout: float = 30) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    logs = docker("logs", name, check=False)
    raise AssertionError(f"the agent container was not ready: {logs.stdout[-2000:]} {logs.stderr[-2000:]}")


def test_the_daemonset_agent_from_the_image_captures_and_leaves(cluster: Cluster, netns: Namespace) -> None:
    node = cluster.node
    cluster.dirs.run_dir.mkdir()
    port = free_port()
    host_paths = {"/opt/cni/bin": node.cni_bin, "/etc/cni/net.d": node.conf_dir,
                  "/var/run/istio-init-cni": cluster.dirs.run_dir}
    name = f"iin-agent-{uuid.uuid4().hex[:10]}"
    docker("run", "-d", "--name", name, *daemonset_run_args(host_paths, port))
    try:
        _wait_ready(port, name)
        cluster.wait_loaded(chained=True)
        case = next(c for c in CNI_CASES if c.name == "basic")
        want, tables = golden_text(case, netns)
        meshed, meshed_config = cluster.run("meshed", MESHED)
        plain, plain_config = cluster.run("plain", None)
        assert canonical(cluster.save(meshed), tables) == want
        assert cluster.ours(plain) == ""
        image = f"docker.io/library/{IMAGE}" if "/" not in IMAGE.split(":")[0] else IMAGE
        assert validate(cluster, meshed, meshed_config, image, ["istio-init", *VALIDATION_FLAGS])[0] == 0
        assert validate(cluster, plain, plain_config, image, ["istio-init", *VALIDATION_FLAGS])[0] == 126
        cluster.remove(meshed)
        cluster.remove(plain)
        docker("stop", "-t", "30", name, timeout=60)
        assert [p["type"] for p in primary_plugins(node.conf_dir)] == ["bridge"]
        assert not (node.cni_bin / PLUGIN_TYPE).exists()
        assert not (cluster.dirs.run_dir / "agent.sock").exists()
    finally:
        docker("rm", "-f", name, check=False)
