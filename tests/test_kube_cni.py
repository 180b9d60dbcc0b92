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

from cases_cni import CNI_CASES, STATUS, CniCase
from cnicluster import golden_text
from istio_golden import canonical
from kubenode import NODE_IP, Node
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


def golden(case: CniCase) -> tuple[str, list[str]]:
    """Istio's golden for a case as the kernel reads it back (loaded into a scratch namespace)."""
    scratch = Namespace.create("iik-golden")
    try:
        return golden_text(case, scratch)
    finally:
        scratch.remove()


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
            want, tables = golden(case)
            got = canonical(pod_save(node, found[f"cni-{case.name.lower()}"]), tables)
            assert got == want, case.name
    finally:
        node.kubectl("delete", "pods", "-l", "cni-case=yes", "--wait=true", "--timeout=90s", check=False, timeout=120)


def test_a_pod_without_the_annotations_gets_nothing(kube_node: Node, agent: dict[str, Any],
                                                    client: dict[str, Any]) -> None:
    for backend in ("legacy", "nft"):
        saved = in_pod_netns(kube_node, client, f"iptables-{backend}-save").stdout
        assert "ISTIO" not in saved, saved


# The agent with `--kubeconfig`: a kubeconfig the DaemonSet's service account authenticates with
# (its mounted token and CA), the API server at the node's address (the agent has the host network).
AGENT_KUBECONFIG = f"""apiVersion: v1
kind: Config
clusters:
- name: node
  cluster:
    server: https://{NODE_IP}:6443
    certificate-authority: /var/run/secrets/kubernetes.io/serviceaccount/ca.crt
users:
- name: istio-init-cni
  user:
    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token
contexts:
- name: node
  context: {{cluster: node, user: istio-init-cni}}
current-context: node
"""

# Pods whose facts only the pod spec carries: (name, golden, annotations, the istio-proxy
# container's securityContext, its env). Istio's custom-uid goldens (tests/cases_cni.py) and, through the
# container's env instead of an annotation, its DNS golden; DISABLE_ENVOY leaves the pod alone.
SPEC_CASES = [
    *[(f"api-{case.name}", case.golden_name, dict(case.annotations),
       {k: v for k, v in (("runAsUser", case.proxy_uid), ("runAsGroup", case.proxy_gid)) if v is not None}, {})
      for case in CNI_CASES if not case.by_annotations_only],
    ("api-dns-env", "dns", {STATUS: "true"}, {}, {"ISTIO_META_DNS_CAPTURE": "true"}),
    ("api-disable-envoy", None, {STATUS: "true"}, {}, {"DISABLE_ENVOY": "true"}),
]


def spec_pod(name: str, annotations: dict[str, str], security: dict[str, int], env: dict[str, str]) -> dict[str, Any]:
    proxy = {"name": "istio-proxy", "image": TEST_IMAGE, "imagePullPolicy": "Never",
             "securityContext": security, "env": [{"name": k, "value": v} for k, v in env.items()]}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name.lower(), "labels": {"cni-case": "api"},
                         "annotations": annotations},
            "spec": {"terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "app", "image": TEST_IMAGE, "imagePullPolicy": "Never"}, proxy]}}


def test_with_kubeconfig_the_custom_uid_goldens_pass(kube_node: Node, agent: dict[str, Any]) -> None:
    node = kube_node
    apply(node, {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "istio-init-cni-kubeconfig", "namespace": "kube-system"},
                 "data": {"kubeconfig": AGENT_KUBECONFIG}})
    node.kubectl("patch", "-n", "kube-system", "daemonset", "istio-init-cni", "--type", "json", "--patch", json.dumps([
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--kubeconfig"},
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "/etc/istio-init-cni/kubeconfig"},
        {"op": "add", "path": "/spec/template/spec/volumes/-",
         "value": {"name": "kubeconfig", "configMap": {"name": "istio-init-cni-kubeconfig"}}},
        {"op": "add", "path": "/spec/template/spec/containers/0/volumeMounts/-",
         "value": {"name": "kubeconfig", "mountPath": "/etc/istio-init-cni"}}]))
    node.kubectl("rollout", "status", "-n", "kube-system", "daemonset/istio-init-cni", "--timeout=150s", timeout=180)
    [agent_pod] = ready_pods(node, AGENT_LABEL, 1, namespace="kube-system")
    assert "--kubeconfig" in agent_pod["spec"]["containers"][0]["args"]
    apply(node, *[spec_pod(name, annotations, security, env) for name, _, annotations, security, env in SPEC_CASES])
    try:
        found = {p["metadata"]["name"]: p for p in ready_pods(node, "cni-case=api", len(SPEC_CASES))}
        for name, golden_name, _, _, _ in SPEC_CASES:
            saved = pod_save(node, found[name.lower()])
            if golden_name is None:
                assert "ISTIO" not in saved, (name, saved)
                continue
            want, tables = golden(next(c for c in CNI_CASES if c.golden_name == golden_name))
            assert canonical(saved, tables) == want, name
    finally:
        node.kubectl("delete", "pods", "-l", "cni-case=api", "--wait=true", "--timeout=90s", check=False, timeout=120)


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
