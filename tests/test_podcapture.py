"""The CNI form's per-pod decision (podcapture.py): Istio's order, its flags, and its goldens.

Pure tests compare each chain's jump targets with Istio's CNI golden without a
kernel; the root test loads the golden into a fresh namespace with
iptables-legacy-restore and compares the kernel's reading of it with our dry
run, so the comparison is exact in spelling too.
"""

from __future__ import annotations

import pytest

from cases_cni import CNI_CASES, ISTIO_GOLDEN_DIR, CniCase
from istio_golden import canonical, final_targets, restore_inputs, tables_in_order
from istio_init import podcapture
from istio_init.iptables_save.read import parse_save
from istio_init.errors import AnnotationError
from istio_init.podcapture import Capture, MeshSettings, PodFacts, Skip, decide
from istio_init.iptables_save.write import render_plan, split_families
from istio_init.rulesets import plan
from nsutil import Namespace

MESH = MeshSettings()
STATUS = {"sidecar.istio.io/status": "true"}


def _facts(case: CniCase, namespace: str = "default") -> PodFacts:
    return PodFacts(namespace, "pod", case.annotations, case.proxy_uid, case.proxy_gid)


def _dry_run(case: CniCase) -> str:
    decision = decide(_facts(case), MESH)
    assert isinstance(decision, Capture)
    return render_plan(plan(decision.config, False))


def test_every_istio_cni_golden_has_a_case() -> None:
    assert {p.name.removesuffix(".txt.golden") for p in ISTIO_GOLDEN_DIR.glob("*.golden")} == \
        {case.golden_name for case in CNI_CASES}


@pytest.mark.parametrize("case", CNI_CASES, ids=lambda c: c.name)
def test_chain_targets_match_istio_cni_golden(case: CniCase) -> None:
    ours = split_families(_dry_run(case))[0]
    istio = restore_inputs(case.istio_golden.read_text(), {})[0]
    planned = {(name, chain): [r.spec.split()[r.spec.split().index("-j") + 1] for r in table.rules
                               if r.chain == chain]
               for name, table in parse_save(ours).items() for chain in {r.chain for r in table.rules}}
    assert planned == final_targets(istio)
    assert sorted(tables_in_order(ours)) == sorted(tables_in_order(istio))


@pytest.mark.root
@pytest.mark.parametrize("case", CNI_CASES, ids=lambda c: c.name)
def test_dry_run_equals_istio_cni_golden_read_by_the_kernel(case: CniCase, netns: Namespace) -> None:
    istio = restore_inputs(case.istio_golden.read_text(), {})[0]
    netns.run("iptables-legacy-restore", "--noflush", input=istio)
    ours = split_families(_dry_run(case))[0]
    assert canonical(netns.save("iptables-legacy-save"), tables_in_order(ours)) == ours


@pytest.mark.parametrize("facts, reason", [
    (PodFacts("", "pod", STATUS), "not a Kubernetes pod"),
    (PodFacts("default", "", STATUS), "not a Kubernetes pod"),
    (PodFacts("kube-system", "pod", STATUS), "namespace kube-system is excluded"),
    (PodFacts("kube-system", "pod", None), "namespace kube-system is excluded"),
    (PodFacts("default", "pod", {**STATUS, "sidecar.istio.io/inject": "false"}), "sidecar.istio.io/inject"),
    (PodFacts("default", "pod", {**STATUS, "sidecar.istio.io/inject": "F"}), "sidecar.istio.io/inject"),
    (PodFacts("default", "pod", {}), "no sidecar.istio.io/status"),
    (PodFacts("default", "pod", {"sidecar.istio.io/status": '{"initContainers":["istio-init"],'
                                 '"containers":["istio-proxy"]}'}), "istio-init"),
])
def test_skipped_pods(facts: PodFacts, reason: str) -> None:
    decision = decide(facts, MESH)
    assert isinstance(decision, Skip)
    assert reason in decision.reason


def test_injected_for_cni_is_captured() -> None:
    status = '{"initContainers":["istio-validation"],"containers":["istio-proxy"]}'
    decision = decide(PodFacts("default", "pod", {"sidecar.istio.io/status": status,
                                                  "sidecar.istio.io/inject": "yes"}), MESH)
    assert isinstance(decision, Capture)
    assert decision.config.inbound_ports.all and decision.config.outbound_cidrs.all


def test_flags_are_sidecar_redirects() -> None:
    decision = decide(PodFacts("default", "pod", {
        **STATUS, "traffic.sidecar.istio.io/excludeInboundPorts": "15021,8080",
        "traffic.sidecar.istio.io/includeOutboundPorts": "9090",
        "traffic.sidecar.istio.io/excludeInterfaces": "eth9",
        "traffic.sidecar.istio.io/kubevirtInterfaces": "old0",
        "istio.io/reroute-virtual-interfaces": "net1"}), MESH)
    assert isinstance(decision, Capture)
    argv = list(decision.flags)
    assert argv[argv.index("-d") + 1] == "15021,8080,15020,15090"
    assert argv[argv.index("-k") + 1] == "net1"
    assert argv[argv.index("-q") + 1] == "9090"
    assert argv[argv.index("-c") + 1] == "eth9"
    assert argv[argv.index("-o") + 1] == "15020"
    assert [argv[argv.index(f) + 1] for f in ("-p", "-z", "-u", "-g", "-m", "-i", "-b")] == \
        ["15001", "15006", "1337", "1337", "REDIRECT", "*", "*"]
    deprecated = decide(PodFacts("default", "pod", {**STATUS, "traffic.sidecar.istio.io/kubevirtInterfaces": "old0"}),
                        MESH)
    assert isinstance(deprecated, Capture) and deprecated.config.kube_virt_interfaces == ("old0",)


def test_mesh_settings_and_per_pod_proxy_metadata() -> None:
    mesh = MeshSettings(proxy_env={"ISTIO_META_DNS_CAPTURE": "true", "INVALID_DROP": "true"})
    captured = decide(PodFacts("default", "pod", STATUS), mesh)
    assert isinstance(captured, Capture)
    assert captured.config.dns_capture and captured.config.capture_all_dns and captured.config.drop_invalid
    override = {**STATUS, "proxy.istio.io/config": '{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "false"}}'}
    per_pod = decide(PodFacts("default", "pod", override), mesh)
    assert isinstance(per_pod, Capture)
    assert not per_pod.config.dns_capture and per_pod.config.drop_invalid


@pytest.mark.parametrize("annotations, named", [
    ({"sidecar.istio.io/interceptionMode": "tproxy"}, "sidecar.istio.io/interceptionMode: 'tproxy'"),
    ({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0"},
     "traffic.sidecar.istio.io/includeOutboundIPRanges: '10.0.0.0'"),
    ({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"},
     "traffic.sidecar.istio.io/excludeOutboundIPRanges: '10.0.0.0/33'"),
    ({"traffic.sidecar.istio.io/includeInboundPorts": "80,http"}, "traffic.sidecar.istio.io/includeInboundPorts"),
    ({"traffic.sidecar.istio.io/excludeInboundPorts": "70000"},
     "traffic.sidecar.istio.io/excludeInboundPorts: '70000'"),
    ({"traffic.sidecar.istio.io/excludeOutboundPorts": "x"}, "traffic.sidecar.istio.io/excludeOutboundPorts: 'x'"),
    ({"traffic.sidecar.istio.io/excludeInterfaces": "a b"}, "traffic.sidecar.istio.io/excludeInterfaces"),
    ({"proxy.istio.io/config": "proxyMetadata: [unclosed"}, "proxy.istio.io/config"),
    ({"proxy.istio.io/config": "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: maybe\n"},
     "proxy.istio.io/config proxyMetadata.ISTIO_META_DNS_CAPTURE: 'maybe'"),
])
def test_invalid_annotation_is_named(annotations: dict[str, str], named: str) -> None:
    with pytest.raises(AnnotationError) as failed:
        decide(PodFacts("default", "pod", {**STATUS, **annotations}), MESH)
    assert named in str(failed.value)


def test_missing_capability_is_named() -> None:
    with pytest.raises(AnnotationError) as failed:
        decide(PodFacts("default", "pod", None), MESH)
    assert "io.kubernetes.cri.pod-annotations" in str(failed.value) and "containerd 1.5" in str(failed.value)


def test_facts_from_runtime() -> None:
    args = "K8S_POD_NAME=web;IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_NAMESPACE=shop"
    facts = podcapture.facts_from_runtime(args, {"io.kubernetes.cri.pod-annotations": {"a": "b"}})
    assert (facts.namespace, facts.name, facts.annotations) == ("shop", "web", {"a": "b"})
    assert podcapture.facts_from_runtime(args, {"io.kubernetes.cri.pod-annotations": None}).annotations == {}
    assert podcapture.facts_from_runtime(args, {}).annotations is None
    assert podcapture.facts_from_runtime(args, None).annotations is None
