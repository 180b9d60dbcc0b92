"""istio-init as a real pod's init container, through a real kubelet (tests/kubenode.py).

The manifests are the project's own (container/kubernetes/), applied with `kubectl apply`; the
only changes are local images (`imagePullPolicy: Never`) and, where Istio's proxy would run, the
stand-in of tests/kubeimages.py (uid 1337, on 15001 and 15006, answering with the original
destination). A client pod outside the mesh answers on 9090.

1. The seed's Deployment (deployment.yaml): the init container runs first, with the seed's
   capabilities, and exits 0; `iptables -t nat -nvL` in the pod is the seed's Console 2;
   connections from the client and the app land on the stand-in with their original
   destination, the stand-in's own do not; a deleted pod comes back from the ReplicaSet with the
   same rules; `kubectl logs -c istio-init` names the backend and shows the rules.
2. Current Istio's pod (deployment-current.yaml, the image built for current Istio), and the same
   pod as Istio 1.17 injects it (the 1.8 image told its release by ISTIO_INIT_RULES_VERSION): the
   rules are the dry run's for that release, and the traffic goes the same way.
4. check-probe.yaml: the `istio-init check` readiness probe turns the pod NotReady when a rule in
   its namespace is deleted, and Ready again after the rules are applied again.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any, Iterator

import pytest

from conftest import KUBE_TIMINGS
from kubenode import Node
from kubepods import (APP_LABEL, CLIENT_PORT, CONSOLE_2, MANIFESTS, ROOT, SEED_FLAGS, apply,
                      ca_configmap, check_traffic, client_pod, container_id, get, in_pod_netns, local_deployment,
                      normalize_nvl, pod_nat, pod_nat_rules, pods, ready_pods,
                      wait_for)

pytestmark = [pytest.mark.kube, pytest.mark.root]



@pytest.fixture(scope="module")
def client(kube_node: Node) -> Iterator[dict[str, Any]]:
    apply(kube_node, client_pod(port=CLIENT_PORT))
    [pod] = ready_pods(kube_node, "app=client", 1)
    yield pod
    kube_node.kubectl("delete", "pod", "client", "--wait=true", "--timeout=90s", check=False, timeout=120)


@pytest.fixture
def workload(kube_node: Node) -> Iterator[None]:
    """Removes the test's Deployment (and its pods) afterwards."""
    yield
    kube_node.kubectl("delete", "deployment", "nginx-deployment", "--ignore-not-found", "--wait=true",
                      "--timeout=60s", check=False, timeout=90)
    wait_for("the Deployment's pods to be gone", lambda: not pods(kube_node, APP_LABEL), timeout=60)


def seed_deployment(node: Node, image: str) -> dict[str, Any]:
    """deployment.yaml with one replica, the test image for nginx and a stand-in for Envoy."""
    return local_deployment(node, MANIFESTS / "deployment.yaml", {"istio-init": image})


def current_deployment(node: Node, image: str) -> dict[str, Any]:
    """deployment-current.yaml with one replica and the sidecar injection adds (here: the stand-in)."""
    proxy = {"name": "istio-proxy", "securityContext": {
        "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}}
    return local_deployment(node, MANIFESTS / "deployment-current.yaml", {"istio-init": image}, proxy)


def start_deployment(node: Node, deployment: dict[str, Any], timing: str) -> dict[str, Any]:
    begin = time.monotonic()
    apply(node, ca_configmap(), deployment)
    [pod] = ready_pods(node, APP_LABEL, 1)
    KUBE_TIMINGS[timing] = time.monotonic() - begin
    return pod


def check_init_container(node: Node, pod: dict[str, Any]) -> None:
    """istio-init ran before the pod's containers, with the seed's securityContext, and exited 0."""
    [status] = pod["status"]["initContainerStatuses"]
    terminated = status["state"].get("terminated")
    assert terminated and terminated["exitCode"] == 0 and terminated["reason"] == "Completed", status
    for c in pod["status"]["containerStatuses"]:
        assert c["state"]["running"]["startedAt"] >= terminated["finishedAt"], (c, terminated)
    # The OCI spec containerd ran it with: uid 0, NET_ADMIN and NET_RAW only, no new privileges.
    info = json.loads(node.ctr("containers", "info", container_id(pod, "istio-init", init=True)).stdout)
    process = info["Spec"]["process"]
    assert process["user"]["uid"] == 0, process["user"]
    for kind in ("bounding", "effective", "permitted"):
        assert sorted(process["capabilities"][kind]) == ["CAP_NET_ADMIN", "CAP_NET_RAW"], process["capabilities"]
    assert process.get("noNewPrivileges") is True


def init_logs(node: Node, pod: dict[str, Any]) -> str:
    return node.kubectl("logs", pod["metadata"]["name"], "-c", "istio-init").stdout


def dry_run_nat(args: list[str], rules_version: str) -> list[str]:
    """The nat `-A` rules of istio-init's dry run (IPv4 part) for the init container's args."""
    env = {**os.environ, "ISTIO_INIT_RULES_VERSION": rules_version}
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "istio-init"), *args, "-n"], capture_output=True,
                         text=True, timeout=60, env=env, check=True).stdout
    return [line for line in out.split("# IPv6")[0].splitlines() if line.startswith("-A ")]


def init_args(deployment: dict[str, Any]) -> list[str]:
    [init] = deployment["spec"]["template"]["spec"]["initContainers"]
    return list(init["args"])


def test_seed_deployment(kube_node: Node, kube_images: dict[str, str], client: dict[str, Any],
                         workload: None) -> None:
    node = kube_node
    pod = start_deployment(node, seed_deployment(node, kube_images["1.8"]), "seed pod Ready after apply")
    check_init_container(node, pod)
    backend, listing = pod_nat(node, pod)
    assert normalize_nvl(listing) == CONSOLE_2, listing
    check_traffic(node, pod, client)
    logs = init_logs(node, pod)
    assert f"iptables backend {backend}" in logs, logs
    rules = pod_nat_rules(node, pod)
    assert all(rule in logs for rule in rules), logs

    # The ReplicaSet replaces a deleted pod; the new one gets the same rules and behaves the same.
    old = pod["metadata"]["name"]
    node.kubectl("delete", "pod", old, "--wait=false")
    [new] = wait_for("the replacement pod", lambda: [p for p in ready_pods(node, APP_LABEL, 1)
                                                     if p["metadata"]["name"] != old], timeout=120)
    check_init_container(node, new)
    assert pod_nat_rules(node, new) == rules
    check_traffic(node, new, client)


# Pods of other generations: (image variant, the release whose injection template wrote the args, env
# of the init container). Current Istio's pod relies on its image's own default; an older
# generation's pod names its release (tests/test_injected_args.py carries each release's args).
GENERATION_PODS = {
    "current": ("current", None, {}),
    "1.17.8": ("1.8", "1.17.8", {"ISTIO_INIT_RULES_VERSION": "1.17.8"}),
}


@pytest.mark.parametrize("generation", sorted(GENERATION_PODS))
def test_istio_generation_pod(kube_node: Node, kube_images: dict[str, str], client: dict[str, Any],
                              workload: None, generation: str) -> None:
    node = kube_node
    variant, release, env = GENERATION_PODS[generation]
    deployment = current_deployment(node, kube_images[variant])
    [init] = deployment["spec"]["template"]["spec"]["initContainers"]
    init["env"] = [{"name": name, "value": value} for name, value in env.items()]
    pod = start_deployment(node, deployment, f"{generation} pod Ready after apply")
    check_init_container(node, pod)
    rules = pod_nat_rules(node, pod)
    assert rules == dry_run_nat(init_args(deployment), release or "current")
    if generation == "current":
        # The image's own default is current Istio's rule set: no env in the pod says so.
        assert "-A OUTPUT -j ISTIO_OUTPUT" in rules and "-A OUTPUT -p tcp -j ISTIO_OUTPUT" not in rules
    check_traffic(node, pod, client)
    backend, _ = pod_nat(node, pod)
    assert f"iptables backend {backend}" in init_logs(node, pod)


def ready_status(node: Node, name: str) -> str:
    return str(node.kubectl("get", "pod", name, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                            check=False).stdout)


def test_check_probe_follows_the_rules(kube_node: Node, kube_images: dict[str, str], workload: None) -> None:
    node = kube_node
    start_deployment(node, seed_deployment(node, kube_images["1.8"]), "seed pod Ready after apply")
    # check-probe.yaml applied the way it says, with `kubectl patch`; then its period shortened
    # from 30 s to 2 s so the test does not wait a minute for each turn.
    patch = (MANIFESTS / "check-probe.yaml").read_text()
    node.kubectl("patch", "deployment", "nginx-deployment", "--patch", patch)
    names = [c["name"] for c in get(node, "deployment", "nginx-deployment")["spec"]["template"]["spec"]["containers"]]
    path = f"/spec/template/spec/containers/{names.index('istio-init-check')}"
    node.kubectl("patch", "deployment", "nginx-deployment", "--type", "json", "--patch", json.dumps([
        {"op": "replace", "path": f"{path}/readinessProbe/periodSeconds", "value": 2},
        {"op": "replace", "path": f"{path}/imagePullPolicy", "value": "Never"}]))
    node.kubectl("rollout", "status", "deployment/nginx-deployment", "--timeout=120s", timeout=150)
    [pod] = ready_pods(node, APP_LABEL, 1)
    assert "istio-init-check" in [c["name"] for c in pod["spec"]["containers"]]
    name = pod["metadata"]["name"]
    backend, _ = pod_nat(node, pod)

    # A rule deleted in the pod's namespace (as a node agent flushing nat would): NotReady.
    in_pod_netns(node, pod, f"iptables-{backend}", "-t", "nat", "-D", "ISTIO_REDIRECT", "-p", "tcp",
                 "-j", "REDIRECT", "--to-ports", "15001")
    wait_for("the pod to turn NotReady", lambda: ready_status(node, name) == "False", timeout=60)

    def probe_failure_event() -> str:  # the kubelet posts its events a little after the status
        events = node.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o",
                              "jsonpath={.items[*].message}").stdout
        return events if "Readiness probe failed" in events and "ISTIO_REDIRECT" in events else ""

    wait_for("the probe's failure, naming the chain, among the pod's events", probe_failure_event, timeout=30)

    # The rules applied again (istio-init with the same flags, in the pod's namespace): Ready again.
    in_pod_netns(node, pod, str(ROOT / ".venv" / "bin" / "istio-init"), *SEED_FLAGS)
    wait_for("the pod to turn Ready again", lambda: ready_status(node, name) == "True", timeout=60)
    assert get(node, "pod", name)["status"]["containerStatuses"][0]["restartCount"] == 0
