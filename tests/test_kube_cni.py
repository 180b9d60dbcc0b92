"""The CNI form through a real kubelet: the DaemonSet of container/kubernetes/cni/ applied for real.

Its agent pod runs on the node (host network, hostPath mounts into the node's CNI dirs, which
inside the node's mount namespace are the dirs containerd reads: tests/kubenode.py), installs
the static plugin and chains it after the node's bridge. Then pods made from manifests that
carry the injector's annotations get their rules through kubelet -> containerd -> plugin ->
agent, equal to Istio's own CNI plugin goldens (tests/cases_cni.py), and cni/deployment.yaml's
`istio-validation` init container (uid 1337, no capabilities) passes; a pod without the
annotations gets nothing; and once the DaemonSet is deleted the agent has unchained itself and
the node starts pods as before.

The tests run in file order and share the DaemonSet (module fixture).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

from cases_cni import CNI_CASES, CniCase
from cnicluster import golden_text
from istio_golden import canonical
from kubenode import Node
from kubepods import (APP_LABEL, MANIFESTS, TEST_IMAGE, apply, ca_configmap, check_traffic, client_pod,
                      container_id, in_pod_netns, local_deployment, manifest, pin_images, pods, ready_pods,
                      wait_for)
from nsutil import Namespace

pytestmark = [pytest.mark.kube, pytest.mark.root]

AGENT_LABEL = "app=istio-init-cni"
PLUGIN = "istio-init-cni"


def chained(node: Node) -> list[str]:
    """The plugin types of the node's primary CNI configuration, in order."""
    conflist = json.loads((node.cni_conf / "10-iik.conflist").read_text())
    return [plugin["type"] for plugin in conflist["plugins"]]


@pytest.fixture(scope="module")
def agent(kube_node: Node, kube_images: dict[str, str]) -> Iterator[dict[str, Any]]:
    objects = manifest(kube_node, MANIFESTS / "cni" / "daemonset.yaml")
    for obj in objects:
        if obj["kind"] == "DaemonSet":
            pin_images(obj, {"cni-agent": kube_images["1.8"]})
    apply(kube_node, *objects)
    [pod] = ready_pods(kube_node, AGENT_LABEL, 1, namespace="kube-system")
    yield pod
    kube_node.kubectl("delete", "-n", "kube-system", "daemonset", "istio-init-cni", "--ignore-not-found",
                      check=False, timeout=90)


@pytest.fixture(scope="module")
def client(kube_node: Node, agent: dict[str, Any]) -> Iterator[dict[str, Any]]:
    apply(kube_node, client_pod("cni-client"))
    [pod] = ready_pods(kube_node, "app=cni-client", 1)
    yield pod
    kube_node.kubectl("delete", "pod", "cni-client", "--wait=true", "--timeout=90s", check=False, timeout=120)


def pod_save(node: Node, pod: dict[str, Any]) -> str:
    """iptables-save of the pod's namespace, of the backend holding istio's chains (legacy if none)."""
    texts = {backend: in_pod_netns(node, pod, f"iptables-{backend}-save").stdout for backend in ("legacy", "nft")}
    return next((text for text in texts.values() if "ISTIO_" in text), texts["legacy"])


def test_the_agent_installs_itself_on_the_node(kube_node: Node, agent: dict[str, Any]) -> None:
    assert agent["spec"]["hostNetwork"] is True
    assert agent["spec"]["nodeName"] == "iik-node"
    mounts = {v["name"]: v["hostPath"]["path"] for v in agent["spec"]["volumes"] if "hostPath" in v}
    assert mounts == {"cni-bin-dir": "/opt/cni/bin", "cni-conf-dir": "/etc/cni/net.d",
                      "run-dir": "/var/run/istio-init-cni"}
    plugin = kube_node.cni_bin / PLUGIN
    assert plugin.is_file() and not plugin.is_symlink()
    assert chained(kube_node) == ["bridge", PLUGIN]


def cni_deployment(node: Node, image: str) -> dict[str, Any]:
    """cni/deployment.yaml with one replica, the test image for nginx and a stand-in for Envoy."""
    return local_deployment(node, MANIFESTS / "cni" / "deployment.yaml", {"istio-validation": image})


def test_a_meshed_deployment_is_captured_and_validated(kube_node: Node, kube_images: dict[str, str],
                                                       agent: dict[str, Any], client: dict[str, Any],
                                                       netns: Namespace) -> None:
    node = kube_node
    apply(node, ca_configmap(), cni_deployment(node, kube_images["1.8"]))
    try:
        [pod] = ready_pods(node, APP_LABEL, 1)
        # The validation init container: uid 1337, no capabilities at all, and it passed.
        [status] = pod["status"]["initContainerStatuses"]
        assert status["name"] == "istio-validation" and status["state"]["terminated"]["exitCode"] == 0, status
        info = json.loads(node.ctr("containers", "info", container_id(pod, "istio-validation", init=True)).stdout)
        process = info["Spec"]["process"]
        assert process["user"]["uid"] == 1337
        assert all(not process["capabilities"].get(kind) for kind in ("bounding", "effective", "permitted"))
        # The rules are Istio's CNI golden for a pod with the injector's default annotations.
        [basic] = [case for case in CNI_CASES if case.name == "basic"]
        want, tables = golden_text(basic, netns)
        assert canonical(pod_save(node, pod), tables) == want
        check_traffic(node, pod, client)
    finally:
        node.kubectl("delete", "deployment", "nginx-deployment-cni", "--wait=true", "--timeout=60s",
                     check=False, timeout=90)
    wait_for("the Deployment's pods to be gone", lambda: not pods(node, APP_LABEL), timeout=60)


ANNOTATION_CASES = [case for case in CNI_CASES if case.by_annotations_only]


def annotated_pod(case: CniCase) -> dict[str, Any]:
    name = f"cni-{case.name.lower()}"
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"cni-case": "yes"}, "annotations": dict(case.annotations)},
            "spec": {"terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "app", "image": TEST_IMAGE, "imagePullPolicy": "Never"}]}}


def test_each_annotation_case_gets_istios_cni_golden(kube_node: Node, agent: dict[str, Any],
                                                     netns: Namespace) -> None:
    node = kube_node
    apply(node, *[annotated_pod(case) for case in ANNOTATION_CASES])
    try:
        found = {p["metadata"]["name"]: p for p in ready_pods(node, "cni-case=yes", len(ANNOTATION_CASES))}
        for case in ANNOTATION_CASES:
            scratch = Namespace.create("iik-golden")
            try:
                want, tables = golden_text(case, scratch)
            finally:
                scratch.remove()
            got = canonical(pod_save(node, found[f"cni-{case.name.lower()}"]), tables)
            assert got == want, case.name
    finally:
        node.kubectl("delete", "pods", "-l", "cni-case=yes", "--wait=true", "--timeout=90s", check=False, timeout=120)


def test_a_pod_without_the_annotations_gets_nothing(kube_node: Node, agent: dict[str, Any],
                                                    client: dict[str, Any]) -> None:
    for backend in ("legacy", "nft"):
        saved = in_pod_netns(kube_node, client, f"iptables-{backend}-save").stdout
        assert "ISTIO" not in saved, saved


def test_deleting_the_daemonset_leaves_a_working_node(kube_node: Node, agent: dict[str, Any]) -> None:
    node = kube_node
    node.kubectl("delete", "-n", "kube-system", "daemonset", "istio-init-cni", "--wait=true", "--timeout=60s",
                 timeout=90)
    # Gone, not only terminating: the agent unchains itself on SIGTERM, before it exits. The
    # kubelet (1.20) deletes the pod object only after its pod cgroup is cleaned up, which the
    # housekeeping behind other pods' cleanup can delay by up to a minute.
    wait_for("the agent pod to be gone", lambda: not node.kubectl(
        "get", "pods", "-n", "kube-system", "-l", AGENT_LABEL, "-o", "name").stdout.strip(), timeout=150)
    assert chained(node) == ["bridge"]
    assert not (node.cni_bin / PLUGIN).exists()
    apply(node, client_pod("after-cni"))
    try:
        [pod] = ready_pods(node, "app=after-cni", 1)
        assert "ISTIO" not in in_pod_netns(node, pod, "iptables-legacy-save").stdout
    finally:
        node.kubectl("delete", "pod", "after-cni", "--wait=true", "--timeout=90s", check=False, timeout=120)
