"""A containerd node with istio-init's CNI agent chained in, as the CNI form's tests drive it over CRI."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from cases_cni import CniCase
from cniagent import AgentDirs, AgentProcess
from containerd_node import ContainerdNode
from cri import CONTAINER_EXITED, M, RuntimeClient
from istio_golden import canonical, restore_inputs, tables_in_order
from istio_init.cni_install import PLUGIN_TYPE
from nsutil import Namespace

VALIDATION_FLAGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337",
                    "--rules-version", "current", "--run-validation", "--skip-rule-apply", "--probe-timeout", "2s"]
MESHED = {"sidecar.istio.io/status": '{"initContainers":["istio-validation"],"containers":["istio-proxy"]}'}


class Cluster:
    """The node, its CRI client and the agent serving it."""

    def __init__(self, node: ContainerdNode, client: RuntimeClient, plugin: Path, dirs: AgentDirs, log: Path):
        self.node, self.client, self.plugin, self.dirs, self.log = node, client, plugin, dirs, log
        self.agent: AgentProcess | None = None
        self.counter = 0

    def start_agent(self) -> AgentProcess:
        self.agent = AgentProcess.start(self.plugin, self.dirs, self.log)
        self.wait_loaded(chained=True)
        return self.agent

    def loaded(self) -> list[str]:
        network = self.client.cni_config()["Networks"][-1]
        return [plugin["Network"]["type"] for plugin in network["Config"]["Plugins"]]

    def wait_loaded(self, chained: bool, timeout: float = 10) -> None:
        """Until containerd has reloaded its CNI configuration (it watches the directory)."""
        deadline = time.monotonic() + timeout
        while (PLUGIN_TYPE in self.loaded()) != chained:
            assert time.monotonic() < deadline, f"containerd did not reload its CNI config: {self.loaded()}"
            time.sleep(0.05)

    def name(self, tag: str) -> str:
        self.counter += 1
        return f"{tag.lower()}-{self.counter}"

    def run(self, tag: str, annotations: dict[str, str] | None, namespace: str = "default") -> tuple[str, Any]:
        config = self.node.sandbox_config(self.name(tag), namespace, annotations)
        return self.run_config(config), config

    def run_config(self, config: Any) -> str:
        sandbox = self.client.run_pod_sandbox(config)
        self.node.sandbox_ids.add(sandbox)
        return sandbox

    def remove(self, sandbox: str) -> None:
        self.client.stop_pod_sandbox(sandbox)
        self.client.remove_pod_sandbox(sandbox)

    def save(self, sandbox: str) -> str:
        pid = self.node.pause_pid(self.client, sandbox)
        return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "iptables-legacy-save"], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def ours(self, sandbox: str) -> str:
        return "".join(line for line in self.save(sandbox).splitlines(keepends=True) if "ISTIO" in line)


def golden_text(case: CniCase, scratch: Namespace) -> tuple[str, list[str]]:
    istio = restore_inputs(case.istio_golden.read_text(), {})[0]
    scratch.run("iptables-legacy-restore", "--noflush", input=istio)
    tables = tables_in_order(istio)
    return canonical(scratch.save(), tables), tables


def validate(cluster: Cluster, sandbox: str, config: Any, image: str, command: list[str],
             mounts: list[Any] | None = None) -> tuple[int, str]:
    """Run Istio's validation container (uid 1337, no capabilities) in the sandbox; (exit code, its log)."""
    security = M["LinuxContainerSecurityContext"](
        capabilities=M["Capability"](drop_capabilities=["ALL"]), run_as_user=M["Int64Value"](value=1337),
        run_as_group=M["Int64Value"](value=1337), no_new_privs=True)
    container = cluster.client.create_container(sandbox, M["ContainerConfig"](
        metadata=M["ContainerMetadata"](name="istio-validation"), image=M["ImageSpec"](image=image),
        command=command, mounts=mounts or [], log_path="istio-validation.log",
        linux=M["LinuxContainerConfig"](security_context=security)), config)
    cluster.client.start_container(container)
    deadline = time.monotonic() + 60
    while (status := cluster.client.container_status(container)).state != CONTAINER_EXITED:
        assert time.monotonic() < deadline, "the validation container did not exit"
        time.sleep(0.1)
    log = Path(config.log_directory, "istio-validation.log")
    text = log.read_text(errors="replace") if log.exists() else ""
    cluster.client.remove_container(container)
    return int(status.exit_code), text
