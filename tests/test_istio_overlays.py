"""The mesh switch-over files (container/kubernetes/istio/): they parse, and Istio would use their image.

Fact carried from Istio's injection template (istio/istio,
manifests/charts/istio-control/istio-discovery/files/injection-template.yaml, tags 1.8.0 and
1.28.0): the init container's and the istio-validation container's image is
`.Values.global.proxy_init.image` verbatim when that value contains "/" (1.8: `{{- if contains "/"
.Values.global.proxy_init.image }}`; 1.28: the same test on the `sidecar.istio.io/proxyImage`
annotation's value, defaulting to `.Values.global.proxy_init.image`), and `HUB/NAME:TAG` (1.8)
or the proxy's image (1.28) otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ISTIO_DIR = Path(__file__).resolve().parent.parent / "container" / "kubernetes" / "istio"
FILES = sorted(ISTIO_DIR.glob("*.yaml"))


def _image(path: Path) -> Any:
    data = yaml.safe_load(path.read_text())
    if path.name.startswith("istiooperator-"):
        assert data["apiVersion"] == "install.istio.io/v1alpha1" and data["kind"] == "IstioOperator"
        data = data["spec"]["values"]
    return data["global"]["proxy_init"]["image"]


def test_there_is_a_helm_file_and_an_overlay_for_each_release() -> None:
    names = {path.name for path in FILES}
    releases = {re.fullmatch(r"(?:helm-values|istiooperator)-(1\.\d+)\.yaml", name).group(1)  # type: ignore[union-attr]
                for name in names}
    assert releases >= {"1.8", "1.28"}
    assert names == {f"{kind}-{release}.yaml" for kind in ("helm-values", "istiooperator") for release in releases}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_the_image_is_used_verbatim_and_its_tag_is_the_files_release(path: Path) -> None:
    from istio_init.config import from_sources

    image = _image(path)
    assert isinstance(image, str) and "/" in image  # else Istio would build HUB/NAME:TAG from it
    release = re.fullmatch(r".*-(1\.\d+)\.yaml", path.name).group(1)  # type: ignore[union-attr]
    name, tag = image.rsplit(":", 1)
    assert name.endswith("/istio-init") and tag == release
    # The tag rule: the image is built with RULES_VERSION=<tag>, which must be a rule set istio-init has.
    config = from_sources({"rules_version": tag}, environ={})
    assert config.rules_version in ("1.8", "current") or config.rules_version.startswith("1.")
    assert f"RULES_VERSION={release} IMAGE={image} scripts/build-image" in path.read_text()
