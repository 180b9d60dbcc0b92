"""The CNI form with real containers: the node programs the pod, the pod only validates.

As tests/test_pod_docker.py, a pause container owns the pod's network namespace
on a 198.51.100.0/24 Docker network. Instead of an init container with
NET_ADMIN, istio-init-cni runs on the host, as a container runtime runs a
chained plugin: CNI_NETNS is the pause container's namespace and prevResult is
what the cluster's plugin (here Docker) gave the pod. Then the validation
container (the image with the seed's args plus --run-validation
--skip-rule-apply, uid 1337, no capabilities, read-only root) must pass, the
proxy, app and client must see the same capture as with the init container,
and DEL must leave the pod's tables as they were. Needs a Docker engine and
the image; skipped otherwise (scripts/ci-docker runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dockerpod import APP_PORT, IMAGE, POD_IP, SEED_ARGS, Pod, check_traffic, connect, docker, nat_appends
from dockerpod import pod  # noqa: F401  (the fixture: a pause container on its own network)


@pytest.fixture
def variant() -> str:
    """The CNI form is tested with the seed's image (dockerpod's `pod` fixture asks for one)."""
    return "1.8"

pytestmark = [pytest.mark.docker, pytest.mark.root]

PLUGIN = Path(sys.executable).with_name("istio-init-cni")
VALIDATION_SECURITY = ["--user", "1337:1337", "--cap-drop", "ALL", "--read-only",
                       "--security-opt", "no-new-privileges"]


@pytest.fixture
def variant() -> str:
    """dockerpod's pod fixture, for the 1.8 image: the seed's args, as the plugin's conflist has."""
    return "1.8"


def pause_netns(pod: Pod) -> str:
    pid = docker("inspect", "-f", "{{.State.Pid}}", pod.pause).stdout.strip()
    return f"/proc/{pid}/ns/net"


def cni(pod: Pod, command: str, log: Path) -> subprocess.CompletedProcess:
    """istio-init-cni on the host, as the runtime calls the last plugin of the pod's conflist."""
    netns = pause_netns(pod)
    prev_result = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": netns}],
                   "ips": [{"address": f"{POD_IP}/24", "interface": 0}]}
    conf = {"cniVersion": "1.0.0", "name": "podnet", "type": "istio-init-cni", "args": SEED_ARGS,
            "logFile": str(log), "prevResult": prev_result}
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": pod.pause, "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod.run_id}"}
    done = subprocess.run([str(PLUGIN)], input=json.dumps(conf), env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    if command == "ADD" and done.returncode == 0:
        assert json.loads(done.stdout) == prev_result
    return done


def validate(pod: Pod, role: str) -> subprocess.CompletedProcess:
    return docker("run", "--rm", "--name", pod.name(role), *pod.in_pod(), *VALIDATION_SECURITY, IMAGE,
                  *SEED_ARGS, "--run-validation", "--skip-rule-apply", "--probe-timeout", "3s",
                  timeout=120, check=False)


def test_cni_form_programs_the_pause_namespace_from_the_host(pod: Pod, tmp_path: Path) -> None:
    before = pod.iptables_save("save-before")

    refused = validate(pod, "validate-before")
    assert refused.returncode == 126, f"validation without rules: {refused.returncode}\n{refused.stderr}"

    added = cni(pod, "ADD", tmp_path / "cni.log")
    assert added.returncode == 0, f"ADD: {added.stdout}\n{(tmp_path / 'cni.log').read_text()}"
    rules = pod.iptables_save("save-after-add")
    dry_run = docker("run", "--rm", "--name", pod.name("dryrun"), *pod.in_pod(), *VALIDATION_SECURITY,
                     IMAGE, *SEED_ARGS, "-n").stdout
    assert [rule for rule in nat_appends(rules) if rule not in nat_appends(before)] == nat_appends(dry_run)
    assert cni(pod, "CHECK", tmp_path / "cni.log").returncode == 0

    passed = validate(pod, "validate")
    assert passed.returncode == 0, f"validation container ({passed.returncode}):\n{passed.stderr}"

    proxy, app, client = pod.start_processes()
    check_traffic(proxy, app, client)  # inbound and outbound captured, the proxy's own not

    removed = cni(pod, "DEL", tmp_path / "cni.log")
    assert (removed.returncode, removed.stdout) == (0, ""), removed.stdout
    after = pod.iptables_save("save-after-del")
    assert "ISTIO_" not in after and nat_appends(after) == nat_appends(before), after
    assert connect(client, POD_IP, APP_PORT) == f"app {APP_PORT} {POD_IP}:{APP_PORT}"
