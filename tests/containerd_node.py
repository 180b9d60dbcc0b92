"""A Kubernetes node as the CNI form meets it: Debian's containerd (its CRI plugin) with runc.

Everything lives under a work dir of the test and inside a network namespace
the test makes (the "node"): containerd runs in a private mount namespace
(`unshare --mount --propagation slave`, then `ip netns exec NODE`), where
/sys/fs/cgroup is bound back after `ip netns exec` remounted /sys, /run is a
fresh tmpfs (containerd 1.6 puts shim sockets in /run/containerd/s whatever
its state dir) and /var/lib is an overlay on a tmpfs (libcni's cache,
/var/lib/cni, is not configurable in 1.6). The primary network is the reference
bridge plugin with host-local IPAM on 198.51.100.0/24. Pods get a cgroup parent
of their own, removed at the end. See /work/shared/notes/containerd.md for why
each setting is there.

Teardown stops and removes every sandbox, then stops containerd by its pid,
kills (by pid) any shim still serving this node's socket, waits for the
processes to go, and removes the namespace and the cgroup directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri import M, RuntimeClient

REFERENCE_PLUGINS = Path("/usr/lib/cni")
SUBNET = "198.51.100.0/24"
GATEWAY = "198.51.100.1"
PAUSE_IMAGE = "localhost/istio-init-test-pause:1"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def missing() -> str | None:
    """Why a containerd node cannot be made here (None: it can)."""
    for tool in ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "unshare", "ip", "gcc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup installs containerd, runc and gcc)"
    if not (REFERENCE_PLUGINS / "bridge").exists():
        return "containernetworking-plugins is not installed (scripts/setup installs it)"
    return None


def primary_conflist() -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "podnet", "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]]}}]}


def config_toml(work: Path) -> str:
    return f"""version = 2
root = "{work}/root"
state = "{work}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{work}/containerd.sock"
[ttrpc]
  address = "{work}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{work}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{work}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{work}/cni-bin"
    conf_dir = "{work}/net.d"
    max_conf_num = 1
"""


def build_pause(directory: Path) -> Path:
    out = directory / "pause"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(Path(__file__).parent / "images" / "pause.c")],
                   check=True, timeout=120, capture_output=True)
    return out


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line mentions `text` (this node's unique work dir)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return [pid for pid in found if pid != os.getpid()]


@dataclass
class ContainerdNode:
    work: Path
    netns: str
    process: subprocess.Popen
    cgroup_parent: str
    sandbox_ids: set[str] = field(default_factory=set)  # every sandbox made, for the leftover check

    @property
    def address(self) -> str:
        return str(self.work / "containerd.sock")

    @property
    def conf_dir(self) -> Path:
        return self.work / "net.d"

    @property
    def cni_bin(self) -> Path:
        return self.work / "cni-bin"

    @classmethod
    def start(cls, work: Path, tag: str) -> "ContainerdNode":
        from pyroute2 import NetNS, netns

        work.mkdir(parents=True, exist_ok=True)
        for sub in ("root", "state", "opt", "runc", "cni-bin", "net.d", "cgroup", "varlib"):
            (work / sub).mkdir(exist_ok=True)
        for plugin in REFERENCE_PLUGINS.iterdir():
            (work / "cni-bin" / plugin.name).symlink_to(plugin)
        (work / "net.d" / "10-podnet.conflist").write_text(json.dumps(primary_conflist(), indent=2))
        (work / "config.toml").write_text(config_toml(work))
        name = f"iin-ctd-{os.getpid()}-{tag}"
        netns.create(name)
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        inner = (f'mount --rbind "{work}/cgroup" /sys/fs/cgroup && mount -t tmpfs -o mode=755 tmpfs /run && '
                 f'mount -t tmpfs tmpfs "{work}/varlib" && mkdir "{work}/varlib/upper" "{work}/varlib/work" && '
                 f'mount -t overlay overlay -o lowerdir=/var/lib,upperdir="{work}/varlib/upper",'
                 f'workdir="{work}/varlib/work" /var/lib && exec containerd --config "{work}/config.toml"')
        outer = f'mount --rbind /sys/fs/cgroup "{work}/cgroup" && exec ip netns exec "{name}" sh -c \'{inner}\''
        log = (work / "containerd.log").open("ab")
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", "sh", "-c", outer],
                                   stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        node = cls(work, name, process, f"/iin-ctd-{os.getpid()}-{tag}")
        try:
            node._wait_serving()
        except BaseException:
            node.stop()
            raise
        return node

    def _wait_serving(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        client = None
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"containerd exited: {self.log_tail()}")
                if os.path.exists(self.address):
                    client = client or RuntimeClient(self.address)
                    with contextlib.suppress(Exception):
                        client.version()
                        return
                time.sleep(0.05)
        finally:
            if client is not None:
                client.close()
        raise RuntimeError(f"containerd did not serve CRI in {timeout}s: {self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "containerd.log").read_text(errors="replace")[-chars:]
        return ""

    def import_image(self, tar: Path) -> None:
        subprocess.run(["ctr", "--address", self.address, "-n", "k8s.io", "images", "import", str(tar)],
                       check=True, capture_output=True, timeout=120)

    def sandbox_config(self, name: str, namespace: str, annotations: dict[str, str] | None = None,
                       uid: str = "") -> Any:
        return M["PodSandboxConfig"](
            metadata=M["PodSandboxMetadata"](name=name, namespace=namespace, uid=uid or f"uid-{name}"),
            hostname=name[:63], annotations=annotations or {}, log_directory=str(self.work / "logs" / name),
            linux=M["LinuxPodSandboxConfig"](cgroup_parent=self.cgroup_parent))

    def ip_leases(self) -> list[str]:
        """host-local's leases on the primary network (kept in containerd's mount namespace)."""
        done = subprocess.run(["nsenter", "-t", str(self.process.pid), "-m", "ls", "/var/lib/cni/networks/podnet"],
                              capture_output=True, text=True, timeout=30)
        return sorted(name for name in done.stdout.split() if name.startswith("198.51.100."))

    def pause_pid(self, client: RuntimeClient, sandbox: str) -> int:
        info = json.loads(client.pod_sandbox_status(sandbox).info["info"])
        return int(info["pid"])

    def stop(self) -> None:
        """Remove every sandbox, stop containerd and its shims by pid, remove the namespace and cgroups."""
        from pyroute2 import netns

        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                client = RuntimeClient(self.address, timeout=30)
                try:
                    for sandbox in client.list_pod_sandboxes():
                        self.sandbox_ids.add(sandbox.id)
                        with contextlib.suppress(Exception):
                            client.stop_pod_sandbox(sandbox.id)
                        with contextlib.suppress(Exception):
                            client.remove_pod_sandbox(sandbox.id)
                finally:
                    client.close()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # Shims (and their runc children) of this node exit once their sandboxes are gone; exited ones
        # linger as zombies for a second or two. After 5 s, any still there are killed by pid.
        started = time.monotonic()
        while (left := _pids_mentioning(str(self.work))) and time.monotonic() - started < 20:
            if time.monotonic() - started > 5:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if self.netns in netns.listnetns():
            netns.remove(self.netns)
        for parent in self._cgroup_dirs():
            if parent.is_dir():
                for child in sorted(parent.iterdir(), reverse=True):
                    if child.is_dir():
                        with contextlib.suppress(OSError):
                            child.rmdir()
                with contextlib.suppress(OSError):
                    parent.rmdir()

    def leftovers(self) -> list[str]:
        """What of this node is still on the machine (empty when the teardown was complete)."""
        from pyroute2 import netns

        found = [f"process {pid}" for pid in _pids_mentioning(str(self.work))]
        if self.netns in netns.listnetns():
            found.append(f"namespace {self.netns}")
        for sandbox in self.sandbox_ids:  # containerd 1.6's fixed shim socket path, here on a private /run
            digest = hashlib.sha256(f"{self.address}/k8s.io/{sandbox}".encode()).hexdigest()
            if os.path.exists(f"/run/containerd/s/{digest}"):
                found.append(f"/run/containerd/s/{digest}")
        with open("/proc/self/mountinfo") as mounts:
            found += [f"mount {line.split()[4]}" for line in mounts if str(self.work) in line]
        found += [f"cgroup {path}" for path in self._cgroup_dirs() if path.exists()]
        return found

    def _cgroup_dirs(self) -> list[Path]:
        """Where runc puts the pods' cgroup parent: under each v1 hierarchy, or at the v2 root."""
        if not CGROUP_ROOT.is_dir():
            return []
        roots = [CGROUP_ROOT, *(d for d in CGROUP_ROOT.iterdir() if d.is_dir() and not d.is_symlink())]
        return [root / self.cgroup_parent.lstrip("/") for root in roots]
