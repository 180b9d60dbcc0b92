"""A node as a container runtime sees it: the reference CNI plugins, then istio-init-cni.

The runtime's part is played here: a "node" network namespace (so the bridge
the reference `bridge` plugin makes, cni0, never appears in the machine's own
namespace), one namespace per pod, and every plugin run as a runtime runs it:
inside the node namespace, CNI_* in the environment, the network
configuration on stdin. `bridge` with `host-local` IPAM on 192.0.2.0/24
(2001:db8:1::/64 for IPv6 pods) goes first; its result is istio-init-cni's
prevResult, as in a chained conflist. host-local keeps its leases in a
directory of the test, and every namespace is removed afterwards.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_PLUGINS = Path("/usr/lib/cni")
PLUGIN = Path(sys.executable).with_name("istio-init-cni")
CNI_VERSION = "1.0.0"  # the newest version Debian's reference plugins speak
NETWORK = "podnet"
SUBNET_V4, GATEWAY_V4 = "192.0.2.0/24", "192.0.2.1"
SUBNET_V6, GATEWAY_V6 = "2001:db8:1::/64", "2001:db8:1::1"
_invocations = itertools.count()


def reference_plugins_missing() -> str | None:
    for name in ("bridge", "host-local", "loopback"):
        if not os.access(REFERENCE_PLUGINS / name, os.X_OK):
            return f"{REFERENCE_PLUGINS / name} is missing (scripts/setup installs containernetworking-plugins)"
    return None


@dataclass
class Invocation:
    """One plugin run: exit status, stdout (the protocol's answer) and stderr."""

    code: int
    stdout: str
    stderr: str

    @property
    def answer(self) -> Any:
        return json.loads(self.stdout)


def wait(process: subprocess.Popen, timeout: float = 90) -> Invocation:
    """Wait (bounded) for a started plugin; killed by its pid when it overruns."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate(timeout=10)
    return Invocation(process.returncode, out, err)


def _create_namespace(name: str) -> None:
    from pyroute2 import NetNS, netns

    netns.create(name)
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def _remove_namespace(name: str) -> None:
    from pyroute2 import netns

    if name in netns.listnetns():
        netns.remove(name)


@dataclass
class CniPod:
    name: str
    container_id: str
    ipv6: bool
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    @property
    def address(self) -> str:
        return self.result["ips"][0]["address"].split("/")[0]

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", f"--net={self.path}", *argv], capture_output=True, text=True,
                              check=check, timeout=timeout)

    def save(self, family: int = 4) -> str:
        return self.run("ip6tables-legacy-save" if family == 6 else "iptables-legacy-save").stdout

    def lock_path(self) -> str:
        """istio-init's lock file for this pod's namespace, as istio-init names it from inside."""
        return self.run(sys.executable, "-c", "from istio_init.host import locks; print(locks.namespace_lock_path())",
                        ).stdout.strip()


@dataclass
class Node:
    """A node namespace, its pods, and the runtime's way of calling plugins."""

    name: str
    state_dir: Path
    pods: list[CniPod] = field(default_factory=list)

    @classmethod
    def create(cls, state_dir: Path, tag: str = "node") -> "Node":
        node = cls(f"iin-{os.getpid()}-{tag}", state_dir)
        _create_namespace(node.name)
        return node

    def bridge_conf(self, ipv6: bool) -> dict[str, Any]:
        subnet, gateway = (SUBNET_V6, GATEWAY_V6) if ipv6 else (SUBNET_V4, GATEWAY_V4)
        return {"cniVersion": CNI_VERSION, "name": NETWORK, "type": "bridge",
                "bridge": "cni6" if ipv6 else "cni0", "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "dataDir": str(self.state_dir / "ipam"),
                         "ranges": [[{"subnet": subnet, "gateway": gateway}]]}}

    def _env(self, command: str, pod: CniPod | None, cni_args: str, netns: str | None) -> dict[str, str]:
        # A runtime passes the plugin little more than the CNI variables; the session's lock directory
        # (conftest.py) goes along so that the plugin locks where the tests look.
        locks = {"ISTIO_INIT_LOCK_DIR": os.environ["ISTIO_INIT_LOCK_DIR"]} if "ISTIO_INIT_LOCK_DIR" in os.environ else {}
        return {**locks, "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                "CNI_COMMAND": command, "CNI_IFNAME": "eth0", "CNI_PATH": str(REFERENCE_PLUGINS),
                "CNI_CONTAINERID": pod.container_id if pod else "none",
                "CNI_NETNS": netns if netns is not None else (pod.path if pod else ""),
                "CNI_ARGS": cni_args or (f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod.name}"
                                         if pod else "")}

    def start(self, plugin: Path | list[str], command: str, pod: CniPod | None, conf: dict[str, Any] | str,
              cni_args: str = "", netns: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `plugin` (a path, or an argv) in the node namespace as the runtime does; the caller waits."""
        text = conf if isinstance(conf, str) else json.dumps(conf)
        conf_file = self.state_dir / f"conf-{next(_invocations)}.json"
        conf_file.write_text(text)
        with conf_file.open() as stdin:
            argv = plugin if isinstance(plugin, list) else [str(plugin)]
            return subprocess.Popen(["nsenter", f"--net=/run/netns/{self.name}", *argv], stdin=stdin,
                                    env={**self._env(command, pod, cni_args, netns), **(env or {})},
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)

    def invoke(self, plugin: Path | list[str], command: str, pod: CniPod | None, conf: dict[str, Any] | str,
               cni_args: str = "", netns: str | None = None, timeout: float = 90,
               env: dict[str, str] | None = None) -> Invocation:
        """Run `plugin` in the node namespace as the runtime does, and wait for it."""
        return wait(self.start(plugin, command, pod, conf, cni_args, netns, env), timeout)

    def add_pod(self, tag: str, ipv6: bool = False) -> CniPod:
        """A pod namespace wired by the reference bridge plugin (the cluster's own CNI)."""
        pod = CniPod(f"iicp-{os.getpid()}-{tag}", f"ctr-{os.getpid()}-{tag}", ipv6)
        _create_namespace(pod.name)
        self.pods.append(pod)
        done = self.invoke(REFERENCE_PLUGINS / "bridge", "ADD", pod, self.bridge_conf(ipv6))
        if done.code != 0:
            raise RuntimeError(f"bridge ADD failed: {done.stdout} {done.stderr}")
        pod.result = done.answer
        return pod

    def istio_conf(self, pod: CniPod | None, args: list[str] | tuple[str, ...], **extra: Any) -> dict[str, Any]:
        """istio-init-cni's entry of the conflist, with the bridge's result as prevResult."""
        conf = {"cniVersion": CNI_VERSION, "name": NETWORK, "type": "istio-init-cni", "args": list(args),
                "logFile": str(self.state_dir / "istio-init-cni.log")}
        if pod is not None:
            conf["prevResult"] = pod.result
        conf.update(extra)
        return conf

    def istio(self, command: str, pod: CniPod | None, args: list[str] | tuple[str, ...] = (), **kw: Any) -> Invocation:
        conf = kw.pop("conf", None) or self.istio_conf(pod, args, **kw.pop("extra", {}))
        return self.invoke(kw.pop("plugin", PLUGIN), command, pod, conf, **kw)

    def remove_pod(self, pod: CniPod) -> None:
        """The runtime's DEL, last plugin first: istio-init-cni, then bridge; then the namespace."""
        self.istio("DEL", pod)
        self.invoke(REFERENCE_PLUGINS / "bridge", "DEL", pod, self.bridge_conf(pod.ipv6))
        _remove_namespace(pod.name)
        if pod in self.pods:
            self.pods.remove(pod)

    def remove(self) -> None:
        for pod in list(self.pods):
            self.remove_pod(pod)
        _remove_namespace(self.name)
