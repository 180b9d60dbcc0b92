"""The CNI agent's API-server source (istio_init/kubeapi.py), without an API server.

The real one is in tests/test_kube_cni.py (Istio's custom-uid goldens through a kubelet); here:
which kubeconfigs are refused and how, Istio's reading of a pod, and the retries.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from istio_init import kubeapi
from istio_init.errors import ConfigError
from istio_init.podcapture import MeshSettings, Skip, capture_flags, decide

KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: c
  cluster: {{server: "{server}"}}
users:
- name: u
  user: {user}
contexts:
- name: x
  context: {{cluster: c, user: u}}
current-context: x
"""


def write(tmp_path: Path, server: str = "https://192.0.2.1:6443", user: str = "{token: abc}") -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG.format(server=server, user=user))
    return str(path)


def test_a_token_kubeconfig_loads(tmp_path: Path) -> None:
    access = kubeapi.load_kubeconfig(write(tmp_path))
    assert (access.host, access.port, access.bearer()) == ("192.0.2.1", 6443, "abc")
    assert access.context.verify_mode == ssl.CERT_REQUIRED


def test_a_token_file_is_read_on_each_request(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    access = kubeapi.load_kubeconfig(write(tmp_path, user="{tokenFile: token}"))
    assert access.bearer() == "first"
    token.write_text("rotated\n")
    assert access.bearer() == "rotated"


@pytest.mark.parametrize("server, user, reason", [
    ("http://192.0.2.1:8080", "{token: abc}", "must be an https:// URL"),
    ("https://192.0.2.1:6443", "{}", "neither a client certificate nor a token"),
    ("https://192.0.2.1:6443", "{client-certificate: c.crt}", "without its key"),
    ("https://192.0.2.1:6443", "{tokenFile: missing}", "cannot be read"),
])
def test_an_unusable_kubeconfig_names_the_flag(tmp_path: Path, server: str, user: str, reason: str) -> None:
    path = write(tmp_path, server, user)
    with pytest.raises(ConfigError) as caught:
        kubeapi.load_kubeconfig(path)
    assert caught.value.flag == "--kubeconfig" and caught.value.value == path
    assert reason in caught.value.reason


def test_a_missing_or_broken_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--kubeconfig"):
        kubeapi.load_kubeconfig(str(tmp_path / "none"))
    (tmp_path / "bad").write_text("clusters: [")
    with pytest.raises(ConfigError, match="not YAML"):
        kubeapi.load_kubeconfig(str(tmp_path / "bad"))


POD = {"metadata": {"namespace": "ns", "name": "p", "annotations": {"sidecar.istio.io/status": "true"}},
       "spec": {"containers": [
           {"name": "app", "securityContext": {"runAsUser": 5}},
           {"name": "istio-proxy", "securityContext": {"runAsUser": 1000670000, "runAsGroup": 1000670001},
            "env": [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]}}


def test_a_pod_is_read_as_istio_reads_it() -> None:
    facts = kubeapi.facts_from_pod(POD)
    assert (facts.namespace, facts.name, facts.proxy_uid, facts.proxy_gid) == ("ns", "p", 1000670000, 1000670001)
    assert facts.proxy_env == {"ISTIO_META_DNS_CAPTURE": "true", "POD_NAME": ""}
    flags = dict(capture_flags(facts, MeshSettings())[0])
    assert (flags["proxy_uid"], flags["proxy_gid"]) == ("1000670000", "1000670001")
    assert flags.get("capture_all_dns") is True  # the container's env, not an annotation


def test_the_containers_env_beats_the_mesh_and_the_annotation() -> None:
    pod = {**POD, "metadata": {**POD["metadata"], "annotations": {  # type: ignore[dict-item]
        "sidecar.istio.io/status": "true",
        "proxy.istio.io/config": "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n"}}}
    flags = dict(capture_flags(kubeapi.facts_from_pod(pod), MeshSettings(proxy_env={"ISTIO_META_DNS_CAPTURE": "false"}))[0])
    assert flags.get("capture_all_dns") is True


def test_disable_envoy_skips_the_pod() -> None:
    spec = {"containers": [{"name": "istio-proxy", "env": [{"name": "DISABLE_ENVOY", "value": "true"}]}]}
    decision = decide(kubeapi.facts_from_pod({**POD, "spec": spec}), MeshSettings())
    assert isinstance(decision, Skip) and "DISABLE_ENVOY" in decision.reason


def test_an_unreachable_server_is_retried_as_istio_does_then_reported(tmp_path: Path) -> None:
    access = kubeapi.load_kubeconfig(write(tmp_path, server="https://127.0.0.1:1"))
    slept: list[float] = []
    source = kubeapi.api_facts_source(access, ("kube-system",), sleep=slept.append)
    with pytest.raises(kubeapi.PodLookupError, match="did not answer.*after 30 tries"):
        source("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p", None)
    assert slept == [1.0] * 29
    # An excluded namespace is never fetched: its pods start while the API server is away.
    assert source("K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=p", None).annotations == {}
