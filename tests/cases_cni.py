"""Istio's CNI plugin goldens and the pods that make them, as the CNI form's cases.

Source (facts carried over as test data, not code): istio/istio at commit
86c9f01fd735fb01d8192f5bcaf0d424afb7f14c,
- `cni/pkg/plugin/testdata/<name>.txt.golden`: copied verbatim to
  `tests/golden/cni/istio/<name>.txt.golden` (the eight that a test uses);
- `cni/pkg/plugin/plugin_dryrun_test.go`, `TestIPTablesRuleGeneration`: each
  case's pod annotations, the istio-proxy container's environment and its
  runAsUser/runAsGroup. The environment becomes the pod's `proxy.istio.io/config`
  proxyMetadata here, the way the injector turns proxyMetadata into that
  environment; runAsUser/runAsGroup are pod facts an annotation cannot carry.

A golden is Istio's `iptables-restore` input (`* nat`, `-N`, `-A` in creation
order): tests load it into a fresh namespace with the restore tool and compare
what the kernel reads back with what istio-init installs or plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ISTIO_GOLDEN_DIR = Path(__file__).parent / "golden" / "cni" / "istio"
ISTIO_SOURCE = "istio/istio 86c9f01 cni/pkg/plugin/testdata"

STATUS = "sidecar.istio.io/status"
TPROXY = {STATUS: "true", "sidecar.istio.io/interceptionMode": "TPROXY"}


@dataclass(frozen=True)
class CniCase:
    name: str
    golden_name: str
    annotations: dict[str, str] = field(default_factory=dict)
    proxy_uid: int | None = None
    proxy_gid: int | None = None

    @property
    def istio_golden(self) -> Path:
        return ISTIO_GOLDEN_DIR / f"{self.golden_name}.txt.golden"

    @property
    def by_annotations_only(self) -> bool:
        """Whether a runtime's annotations alone make this case (no container securityContext)."""
        return self.proxy_uid is None and self.proxy_gid is None


def _metadata(name: str) -> dict[str, str]:
    return {STATUS: "true", "proxy.istio.io/config": f"proxyMetadata:\n  {name}: \"true\"\n"}


CNI_CASES = (
    CniCase("basic", "basic", {STATUS: "true"}),
    CniCase("include-exclude-ip", "include-exclude-ip",
            {STATUS: "true", "traffic.sidecar.istio.io/includeOutboundIPRanges": "127.0.0.0/8",
             "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8"}),
    CniCase("include-exclude-ports", "include-exclude-ports",
            {STATUS: "true", "traffic.sidecar.istio.io/includeInboundPorts": "1111,2222",
             "traffic.sidecar.istio.io/excludeInboundPorts": "3333,4444",
             "traffic.sidecar.istio.io/excludeOutboundPorts": "5555,6666"}),
    CniCase("tproxy", "tproxy", dict(TPROXY)),
    CniCase("DNS", "dns", _metadata("ISTIO_META_DNS_CAPTURE")),
    CniCase("invalid-drop", "invalid-drop", _metadata("INVALID_DROP")),
    CniCase("custom-uid", "custom-uid", {STATUS: "true"}, 1000670000, 1000670001),
    CniCase("custom-uid-zero", "basic", {STATUS: "true"}, 0),
    CniCase("custom-uid-tproxy", "custom-uid-tproxy", dict(TPROXY), 1000670000, 1000670001),
)
