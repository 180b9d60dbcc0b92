"""Helpers for the kube tests: manifests through kubectl, pods' state, their network namespace.

Manifests are the project's YAML files read by kubectl itself (`kubectl apply --dry-run=client
-o json`), changed as plain JSON where a test needs local images, and applied with `kubectl
apply -f -`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from kubenode import Node

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "container" / "kubernetes"
TEST_IMAGE = "localhost/iik-test:1"
ORIGDST = "/bin/origdst"

APP_LABEL = "app=nginx"
CLIENT_PORT = 9090
GRACE = 1  # seconds: the stand-ins do not handle SIGTERM, so deletions would wait the default 30 s

# The seed's init container args (container/kubernetes/deployment.yaml), without `istio-iptables`.
SEED_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
              "-d", "15090,15021,15020"]

# The seed article's Console 2 (`iptables -t nat -nvL` in a pod with Istio 1.8's sidecar;
# /work/shared/seed/istio-sidecar.md, "[Console 2] Pod iptables NAT Table with Istio Sidecar"),
# with the packet and byte counters left out: chain, references, then target, prot, opt, in, out,
# source, destination and the match text of every rule.
CONSOLE_2 = """
Chain PREROUTING (policy ACCEPT)
ISTIO_INBOUND tcp -- * * 0.0.0.0/0 0.0.0.0/0
Chain INPUT (policy ACCEPT)
Chain OUTPUT (policy ACCEPT)
ISTIO_OUTPUT tcp -- * * 0.0.0.0/0 0.0.0.0/0
Chain POSTROUTING (policy ACCEPT)
Chain ISTIO_INBOUND (1 references)
RETURN tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:15008
RETURN tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:22
RETURN tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:15090
RETURN tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:15021
RETURN tcp -- * * 0.0.0.0/0 0.0.0.0/0 tcp dpt:15020
ISTIO_IN_REDIRECT tcp -- * * 0.0.0.0/0 0.0.0.0/0
Chain ISTIO_IN_REDIRECT (3 references)
REDIRECT tcp -- * * 0.0.0.0/0 0.0.0.0/0 redir ports 15006
Chain ISTIO_OUTPUT (1 references)
RETURN all -- * lo 127.0.0.6 0.0.0.0/0
ISTIO_IN_REDIRECT all -- * lo 0.0.0.0/0 !127.0.0.1 owner UID match 1337
RETURN all -- * lo 0.0.0.0/0 0.0.0.0/0 ! owner UID match 1337
RETURN all -- * * 0.0.0.0/0 0.0.0.0/0 owner UID match 1337
ISTIO_IN_REDIRECT all -- * lo 0.0.0.0/0 !127.0.0.1 owner GID match 1337
RETURN all -- * lo 0.0.0.0/0 0.0.0.0/0 ! owner GID match 1337
RETURN all -- * * 0.0.0.0/0 0.0.0.0/0 owner GID match 1337
RETURN all -- * * 0.0.0.0/0 127.0.0.1
ISTIO_REDIRECT all -- * * 0.0.0.0/0 0.0.0.0/0
Chain ISTIO_REDIRECT (1 references)
REDIRECT tcp -- * * 0.0.0.0/0 0.0.0.0/0 redir ports 15001
""".strip()

# Numeric protocols in newer iptables' listing, as the seed's iptables printed them.
_PROTOCOLS = {"6": "tcp", "17": "udp", "0": "all"}


def normalize_nvl(text: str) -> str:
    """`iptables -t nat -nvL` without counters, in CONSOLE_2's form."""
    lines = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] == "pkts":
            continue
        if words[0] == "Chain":
            lines.append(re.sub(r"\(policy (\w+) .*\)", r"(policy \1)", " ".join(words)))
            continue
        rule = words[2:]
        if len(rule) > 1:
            rule[1] = _PROTOCOLS.get(rule[1], rule[1])
        lines.append(" ".join(rule))
    return "\n".join(lines)


def manifest(node: Node, path: Path) -> list[dict[str, Any]]:
    """The objects of a YAML manifest as kubectl reads them."""
    out = node.kubectl("apply", "--dry-run=client", "-o", "json", "-f", str(path)).stdout
    doc = json.loads(out)
    return list(doc["items"]) if doc.get("kind") == "List" else [doc]


def apply(node: Node, *objects: dict[str, Any]) -> str:
    return node.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List",
                                                             "items": list(objects)})).stdout


def get(node: Node, kind: str, name: str, namespace: str = "default") -> dict[str, Any]:
    result: dict[str, Any] = json.loads(node.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)
    return result


def pods(node: Node, selector: str, namespace: str = "default") -> list[dict[str, Any]]:
    out = node.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 120, every: float = 0.5) -> Any:
    """probe()'s first truthy result, polled until timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def ready_pods(node: Node, selector: str, count: int, timeout: float = 120,
               namespace: str = "default") -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        found = pods(node, selector, namespace)
        return found if len(found) == count and all(is_ready(p) for p in found) else None
    try:
        result: list[dict[str, Any]] = wait_for(f"{count} Ready pod(s) {selector}", probe, timeout)
    except AssertionError as exc:
        described = node.kubectl("describe", "pods", "-n", namespace, "-l", selector, check=False).stdout
        raise AssertionError(f"{exc}\n{described[-4000:]}\n--- kubelet:\n{node.log('kubelet')[-3000:]}") from None
    return result


def container_id(pod: dict[str, Any], name: str, init: bool = False) -> str:
    key = "initContainerStatuses" if init else "containerStatuses"
    for status in pod["status"].get(key, []):
        if status["name"] == name:
            return str(status["containerID"]).split("://", 1)[1]
    raise AssertionError(f"no status for container {name} in pod {pod['metadata']['name']}")


def task_pid(node: Node, cid: str) -> int:
    """The host pid of a running container (containerd's task list)."""
    for line in node.ctr("tasks", "ls").stdout.splitlines()[1:]:
        words = line.split()
        if words and words[0] == cid:
            return int(words[1])
    raise AssertionError(f"container {cid} has no running task")


def in_pod_netns(node: Node, pod: dict[str, Any], *argv: str, container: str | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
    """argv from the host's tools, run in the pod's network namespace."""
    name = container or pod["spec"]["containers"][0]["name"]
    pid = task_pid(node, container_id(pod, name))
    result = subprocess.run(["nsenter", "-t", str(pid), "-n", "--", *argv], capture_output=True, text=True,
                            timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} in pod {pod['metadata']['name']} failed: {result.stderr}")
    return result


def pod_nat(node: Node, pod: dict[str, Any]) -> tuple[str, str]:
    """(backend, `iptables -t nat -nvL` text) of the pod: whichever iptables backend holds istio's chains."""
    for backend in ("legacy", "nft"):
        text = in_pod_netns(node, pod, f"iptables-{backend}", "-t", "nat", "-nvL").stdout
        if "ISTIO_" in text:
            return backend, text
    raise AssertionError(f"no ISTIO_ chains in pod {pod['metadata']['name']} in either iptables backend")


def pod_nat_rules(node: Node, pod: dict[str, Any]) -> list[str]:
    """The pod's nat `-A` rules (iptables-save of the backend holding them)."""
    backend, _ = pod_nat(node, pod)
    text = in_pod_netns(node, pod, f"iptables-{backend}-save", "-t", "nat").stdout
    return [line for line in text.splitlines() if line.startswith("-A ")]


def connect(node: Node, pod: dict[str, Any], container: str, host: str, port: int) -> str:
    """What a connection from a container of the pod to host:port is answered with."""
    result = node.kubectl("exec", pod["metadata"]["name"], "-c", container, "--", ORIGDST, "connect", host,
                          str(port), check=False, timeout=60)
    assert result.returncode == 0, f"{container} -> {host}:{port}: {result.stderr}{result.stdout}"
    return result.stdout.strip()


def standin(name: str, label: str, *ports: int) -> dict[str, Any]:
    """A container of the test image serving `origdst serve LABEL PORT...`."""
    return {"name": name, "image": TEST_IMAGE, "imagePullPolicy": "Never",
            "command": [ORIGDST, "serve", label, *map(str, ports)],
            "ports": [{"containerPort": p} for p in ports]}


def client_pod(name: str = "client", port: int = 9090) -> dict[str, Any]:
    """An un-meshed pod answering on `port` with "client <port> <address>"."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": [standin("client", "client", port)]}}


def pin_images(obj: dict[str, Any], images: dict[str, str]) -> None:
    """Local images for a pod template's containers: name -> image, `imagePullPolicy: Never` on all."""
    spec = obj["spec"]["template"]["spec"] if obj["kind"] != "Pod" else obj["spec"]
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        if c["name"] in images:
            c["image"] = images[c["name"]]
        c["imagePullPolicy"] = "Never"


def ca_configmap() -> dict[str, Any]:
    """The ConfigMap Istio's control plane publishes and the seed's pod mounts (any content will do)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio-ca-root-cert"},
            "data": {"root-cert.pem": "not used by the stand-in\n"}}


def as_standin(container: dict[str, Any], label: str, *ports: int) -> None:
    """A manifest's container turned into an origdst stand-in, keeping its securityContext and mounts."""
    container.update(image=TEST_IMAGE, command=[ORIGDST, "serve", label, *map(str, ports)])
    for key in ("args", "readinessProbe", "livenessProbe"):
        container.pop(key, None)


def check_traffic(node: Node, pod: dict[str, Any], client: dict[str, Any]) -> None:
    """Inbound lands on 15006, the app's outbound on 15001, the proxy's own (uid 1337) is not captured."""
    pod_ip, client_ip = pod["status"]["podIP"], client["status"]["podIP"]
    assert connect(node, client, "client", pod_ip, 80) == f"proxy 15006 {pod_ip}:80"
    assert connect(node, pod, "nginx", client_ip, CLIENT_PORT) == f"proxy 15001 {client_ip}:{CLIENT_PORT}"
    assert connect(node, pod, "istio-proxy", client_ip, CLIENT_PORT) == f"client {CLIENT_PORT} {client_ip}:{CLIENT_PORT}"


def local_deployment(node: Node, path: Path, images: dict[str, str], *extra: dict[str, Any]) -> dict[str, Any]:
    """A manifest's Deployment made runnable here: one replica, local images (`images` names
    istio-init's containers), the test image serving on port 80 for nginx and the stand-in
    for Envoy (whose readiness probe asks Envoy's admin port, which the stand-in does not serve);
    `extra` containers are added as they are, after the stand-in treatment of `istio-proxy`."""
    [deployment] = manifest(node, path)
    deployment["spec"]["replicas"] = 1
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriodSeconds"] = GRACE
    spec["containers"] += list(extra)
    containers = {c["name"]: c for c in spec["containers"]}
    as_standin(containers["nginx"], "app", 80)
    as_standin(containers["istio-proxy"], "proxy", 15001, 15006)
    pin_images(deployment, images)
    return deployment
