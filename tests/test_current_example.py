"""The Kubernetes example for current Istio and the image's rule-set build argument.

The example's init container must be the one current Istio injects (its
argument list is the one test_current_apply.py applies for real), and the
image built with RULES_VERSION=current must pick the current rule set without
any env in the pod.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from clirun import invoke

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "container" / "kubernetes" / "deployment-current.yaml"


def _init_container_block(text: str) -> str:
    return text[text.index("initContainers:"):]


def _args(text: str) -> list[str]:
    """The `args:` list of the init container (each item on its own `- ` line)."""
    lines = _init_container_block(text).splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "args:")
    items = []
    for line in lines[start + 1:]:
        match = re.fullmatch(r"\s+- (.*)", line)
        if not match:
            break
        value = match.group(1)
        items.append(json.loads(value) if value.startswith('"') else value)
    return items


def test_example_init_container_is_current_istios_injection() -> None:
    from cases_current import INJECTED

    text = EXAMPLE.read_text()
    assert _args(text) == INJECTED
    block = _init_container_block(text)
    for line in ("- NET_ADMIN", "- NET_RAW", "- ALL", "runAsUser: 0", "runAsNonRoot: false",
                 "image: istio-init:current"):
        assert line in block


def test_example_args_give_the_current_rule_set_from_the_image_env() -> None:
    args = _args(EXAMPLE.read_text())
    result = invoke([*args, "-n", "--ipv6", "false"], {"ISTIO_INIT_RULES_VERSION": "current"})
    assert result.code == 0, result.stderr
    assert "-A OUTPUT -j ISTIO_OUTPUT" in result.stdout and "--dport 22 " not in result.stdout
    assert "rules_version: current" in result.stderr


def test_dockerfile_takes_the_default_rule_set_as_a_build_argument() -> None:
    dockerfile = (ROOT / "container" / "Dockerfile").read_text()
    runtime = dockerfile[dockerfile.index("AS runtime"):]
    assert "ARG RULES_VERSION=1.8" in runtime
    assert "ISTIO_INIT_RULES_VERSION=${RULES_VERSION}" in runtime
    assert 'RULES_VERSION=$RULES_VERSION' in (ROOT / "scripts" / "build-image").read_text()
