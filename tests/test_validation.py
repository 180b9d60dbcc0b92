"""`--run-validation` against real pods: passes when capture works, exit 126 when it does not.

The pods here run no stand-in proxy: validation binds the capture ports
itself, as it does in an init container before the sidecar starts. Rules are
installed by the harness (podnet.apply_istio_init, a separate istio-init run)
and checked with --skip-rule-apply, which is exactly "validate rules somebody
else installed"; one test runs apply and validation together in one command.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Iterator

import pytest

from cases import SEED_ARGS
from podnet import Pod

pytestmark = pytest.mark.root

def validate(pod: Pod, *extra: str, timeout: str = "5s") -> subprocess.CompletedProcess:
    """istio-init --skip-rule-apply --run-validation inside the pod (a subprocess: it enters the namespace)."""
    argv = [sys.executable, "-m", "istio_init", *pod.args, "--ipv6", "true" if pod.ipv6 else "false",
            "--skip-rule-apply", "--run-validation", "--probe-timeout", timeout,
            "--network-namespace", f"/run/netns/{pod.name}", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def seed_pod() -> Iterator[Pod]:
    pod = Pod.up(SEED_ARGS, ipv6=True, listeners=False, tag="valid")
    try:
        yield pod
    finally:
        pod.down()


def test_validation_passes_on_a_correct_pod_both_families(seed_pod: Pod) -> None:
    done = validate(seed_pod)
    assert done.returncode == 0, done.stderr
    assert "validation passed: IPv4" in done.stderr
    assert "validation passed: IPv6" in done.stderr


def test_validation_passes_with_tproxy_and_custom_ports() -> None:
    pod = Pod.up(("-m", "TPROXY", "-b", "*", "-i", "*", "-p", "16001", "-z", "16006", "-u", "1500", "-g", "1501"),
                 ipv6=False, listeners=False, tag="validtp")
    try:
        done = validate(pod, "--iptables-probe-port", "16002")
        assert done.returncode == 0, done.stderr
        assert "validation passed: IPv4: 127.0.0.6:16002 was redirected to 127.0.0.1:16006" in done.stderr
    finally:
        pod.down()


@pytest.mark.parametrize("family", [4, 6])
def test_validation_fails_126_when_the_rules_are_removed(seed_pod: Pod, family: int) -> None:
    saved = seed_pod.save(family)
    try:
        seed_pod.iptables("-t", "nat", "-F", family=family)
        done = validate(seed_pod, timeout="1s")
    finally:
        tool = "iptables-legacy-restore" if family == 4 else "ip6tables-legacy-restore"
        subprocess.run(["nsenter", f"--net=/run/netns/{seed_pod.name}", tool], input=saved, text=True,
                       check=True, capture_output=True, timeout=30)
    assert done.returncode == 126, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    target = "127.0.0.6:15002" if family == 4 else "[::6]:15002"
    listen = "127.0.0.1" if family == 4 else "[::1]"
    assert message.startswith(f"istio-init: validation failed (IPv{family}): expected a connection from")
    assert f"to {target} as uid 1337 gid 1337 to be redirected to {listen}:15001 or {listen}:15006" in message
    assert "refused the connection, so no rule redirected it" in message


def test_validation_fails_when_only_the_proxy_loopback_rule_is_missing(seed_pod: Pod) -> None:
    """The rule validation depends on: the proxy's lo traffic to a non-127.0.0.1 address goes inbound."""
    saved = seed_pod.save(4)
    spec = ["!", "-d", "127.0.0.1/32", "-o", "lo", "-m", "owner", "--uid-owner", "1337", "-j", "ISTIO_IN_REDIRECT"]
    try:
        seed_pod.iptables("-t", "nat", "-D", "ISTIO_OUTPUT", *spec)
        done = validate(seed_pod, "--ipv6", "false", timeout="1s")
    finally:
        subprocess.run(["nsenter", f"--net=/run/netns/{seed_pod.name}", "iptables-legacy-restore"], input=saved,
                       text=True, check=True, capture_output=True, timeout=30)
    assert done.returncode == 126, done.stderr
    assert "validation failed (IPv4)" in done.stderr
    assert validate(seed_pod).returncode == 0  # and restoring the rule makes it pass again


def test_validation_reports_a_busy_capture_port(seed_pod: Pod) -> None:
    """Validation must own the capture ports; if a proxy already holds them the message says so."""
    from podnet import start_server

    server = start_server(seed_pod.name, "busy", tcp=(15001, 15006))
    try:
        done = validate(seed_pod, "--ipv6", "false", timeout="1s")
    finally:
        server.stop()
    assert done.returncode == 126
    assert "cannot listen on 127.0.0.1:15001" in done.stderr


def test_apply_then_validate_in_one_run() -> None:
    pod = Pod.up(SEED_ARGS, ipv6=False, listeners=False, apply=False, tag="validrun")
    try:
        argv = [sys.executable, "-m", "istio_init", *SEED_ARGS, "--ipv6", "false", "--iptables-backend", "legacy",
                "--run-validation", "--network-namespace", f"/run/netns/{pod.name}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert "validation passed: IPv4" in done.stderr
    finally:
        pod.down()
