"""A single-node Kubernetes cluster inside a network namespace, for the kube tests.

etcd, kube-apiserver (Node,RBAC, an openssl PKI), kube-controller-manager, kube-scheduler,
containerd and the kubelet run in one network namespace and one private mount namespace, both
made by `unshare` when containerd starts (every other process joins them with `nsenter -t
<containerd pid>`). Pods get 198.51.100.0/24 addresses from CNI's bridge and host-local plugins.
The node's own address is 192.0.2.1/32 on the namespace's loopback; the service range
203.0.113.0/24 (no kube-proxy: pods talk by pod IP).

Nothing is written to the host outside the work directory (`$ISTIO_INIT_KUBE_WORK`, default
/tmp/istio-init-kube, one subdirectory per node):
- /run, /var/log (the kubelet's hard-coded /var/log/pods) and /var/lib (libcni's cache) are a
  tmpfs or an overlay inside the private mount namespace;
- the host-global sysctls the kubelet would rewrite are read-only bind mounts of files that
  already hold its values, in that mount namespace only;
- every process runs in a cgroup of the node's own (`/istio-init-kube-<id>` in each hierarchy),
  which is also the kubelet's cgroupRoot, so the pods' containers land under it too.

Teardown kills, by pid, every process in that cgroup tree, removes the cgroups and the work
directory; with the processes gone the namespaces and their mounts go too. A node whose owner
(the process that started it) died is stale: `cleanup_stale()` (scripts/kube-node cleanup)
removes it the same way.

The binaries come from scripts/kube-build (`$KUBE_BIN`, default
/var/cache/istio-init/kubernetes-1.20.2/bin); etcd, containerd, runc and the CNI plugins from
Debian's packages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import kubeimages
from kubeimages import PAUSE_IMAGE

KUBE_VERSION = "1.20.2"
KUBE_BIN = Path(os.environ.get("KUBE_BIN", f"/var/cache/istio-init/kubernetes-{KUBE_VERSION}/bin"))
WORK_BASE = Path(os.environ.get("ISTIO_INIT_KUBE_WORK", "/tmp/istio-init-kube"))
CGROUP_FS = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "istio-init-kube-"

NODE_NAME = "iik-node"
NODE_IP = "192.0.2.1"
POD_SUBNET = "198.51.100.0/24"
POD_GATEWAY = "198.51.100.1"
SERVICE_RANGE = "203.0.113.0/24"
SERVICE_IP = "203.0.113.1"  # the `kubernetes` Service, first of the range
BRIDGE = "iik0"

KUBE_BINARIES = ("kube-apiserver", "kubelet", "kube-controller-manager", "kube-scheduler", "kubectl")
HOST_TOOLS = {"etcd": "etcd-server", "containerd": "containerd", "ctr": "containerd", "runc": "runc",
              "openssl": "openssl", "nsenter": "util-linux", "unshare": "util-linux", "ip": "iproute2"}
CNI_DIR = Path("/usr/lib/cni")

# The host-global sysctls kubelet 1.20 sets when they differ (pkg/kubelet/cm/container_manager_linux.go,
# setupKernelTunables), with the values it wants.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": 1,
    "vm/panic_on_oom": 0,
    "kernel/panic": 10,
    "kernel/panic_on_oops": 1,
    "kernel/keys/root_maxkeys": 1000000,
    "kernel/keys/root_maxbytes": 25000000,
}


def missing_parts() -> list[str]:
    """What this machine lacks to run a node (empty when it can)."""
    missing = [f"{KUBE_BIN}/{name} (scripts/kube-build)" for name in KUBE_BINARIES
               if not os.access(KUBE_BIN / name, os.X_OK)]
    missing += [f"{tool} (apt-get install {package})" for tool, package in HOST_TOOLS.items()
                if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK)]
    missing += [f"{CNI_DIR}/{name} (apt-get install containernetworking-plugins)"
                for name in ("bridge", "host-local", "loopback") if not (CNI_DIR / name).exists()]
    if not (CGROUP_FS / "memory").is_dir():
        missing.append("cgroup v1 hierarchies under /sys/fs/cgroup (the kubelet here is set up for them)")
    return missing


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), to tell a pid reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    return start is not None and _start_time(pid) == start


@dataclass
class Node:
    """One node's names and paths; `state.json` in its work dir holds what cleanup needs."""

    node_id: str
    work: Path
    processes: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def new(cls) -> Node:
        node_id = uuid.uuid4().hex[:10]
        return cls(node_id, WORK_BASE / node_id)

    @property
    def cgroup(self) -> str:
        return f"{CGROUP_PREFIX}{self.node_id}"

    @property
    def kubeconfig(self) -> Path:
        return self.work / "pki" / "admin.kubeconfig"

    @property
    def containerd_socket(self) -> Path:
        return self.work / "containerd" / "containerd.sock"

    @property
    def cni_bin(self) -> Path:
        """The node's CNI plugin directory (links to Debian's plugins; a DaemonSet may add its own)."""
        return self.work / "cni" / "bin"

    @property
    def cni_conf(self) -> Path:
        return self.work / "cni" / "net.d"

    @property
    def containerd_pid(self) -> int:
        return self.processes["containerd"]

    # --- state ----------------------------------------------------------------------------------

    def save_state(self, owner: int | None) -> None:
        state = {"node_id": self.node_id, "cgroup": self.cgroup, "processes": self.processes,
                 "owner": owner, "owner_start": _start_time(owner) if owner else None}
        tmp = self.work / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        tmp.replace(self.work / "state.json")

    # --- running things in the node ---------------------------------------------------------------

    def in_node(self, *argv: str) -> list[str]:
        """argv run in the node's network and mount namespaces."""
        return ["nsenter", "-t", str(self.containerd_pid), "-n", "-m", "--", *argv]

    def kubectl(self, *args: str, timeout: float = 60, check: bool = True,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work / "home")}
        argv = self.in_node(str(KUBE_BIN / "kubectl"), "--kubeconfig", str(self.kubeconfig),
                            "--cache-dir", str(self.work / "home" / "cache"), *args)
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, env=env)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        return result

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.in_node("ctr", "--address", str(self.containerd_socket), "-n", "k8s.io", *args),
                              capture_output=True, text=True, timeout=timeout, check=True)

    def import_image(self, tar: Path) -> None:
        """An image tar (`docker save` output or an OCI layout) into containerd's k8s.io namespace."""
        self.ctr("images", "import", str(tar))

    def log(self, name: str) -> str:
        try:
            return (self.work / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    # --- start ---------------------------------------------------------------------------------

    def start(self, owner: int | None, timeout: float = 120) -> None:
        """Everything up to a Ready node whose `default` namespace admits pods."""
        begin = time.monotonic()
        for sub in ("logs", "home", "etcd", "containerd", "kubelet", "mnt/varlib-up", "mnt/varlib-work",
                    "mnt/etc-up", "mnt/etc-work", "mnt/opt-up", "mnt/opt-work", "mnt/cgroup", "sysctl", "volume-plugins", "flex", "cni/ipam"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.save_state(owner)
        _make_pki(self.work / "pki")
        self._write_configs()
        self._make_cgroups()
        self.save_state(owner)
        self._start_containerd()
        self.save_state(owner)
        for tar in kubeimages.build(self.work / "images"):
            self.import_image(tar)
        self.timings["containerd_ready"] = time.monotonic() - begin
        self._spawn("etcd", [
            "etcd", "--name", NODE_NAME, "--data-dir", str(self.work / "etcd"),
            "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", f"{NODE_NAME}=http://127.0.0.1:2380", "--listen-metrics-urls", "",
            "--log-level", "warn", "--logger", "zap"])
        self.save_state(owner)
        pki = self.work / "pki"
        self._spawn("kube-apiserver", [
            str(KUBE_BIN / "kube-apiserver"), "--etcd-servers", "http://127.0.0.1:2379",
            "--advertise-address", NODE_IP, "--bind-address", "0.0.0.0", "--secure-port", "6443",
            "--insecure-port", "0", "--cert-dir", str(pki / "apiserver-certs"),
            "--tls-cert-file", f"{pki}/apiserver.crt", "--tls-private-key-file", f"{pki}/apiserver.key",
            "--client-ca-file", f"{pki}/ca.crt", "--authorization-mode", "Node,RBAC",
            "--enable-admission-plugins", "NodeRestriction", "--allow-privileged=true",
            "--service-cluster-ip-range", SERVICE_RANGE,
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", f"{pki}/sa.key", "--service-account-signing-key-file", f"{pki}/sa.key",
            "--kubelet-client-certificate", f"{pki}/apiserver-kubelet.crt",
            "--kubelet-client-key", f"{pki}/apiserver-kubelet.key",
            "--kubelet-certificate-authority", f"{pki}/ca.crt",
            "--kubelet-preferred-address-types", "InternalIP", "--profiling=false", "--v", "1"])
        self.save_state(owner)
        self._wait(lambda: self.kubectl("get", "--raw", "/readyz", check=False, timeout=10).stdout == "ok",
                   "the API server to be ready", timeout, "kube-apiserver")
        self.timings["apiserver_ready"] = time.monotonic() - begin
        self._spawn("kube-controller-manager", [
            str(KUBE_BIN / "kube-controller-manager"), "--kubeconfig", f"{pki}/controller-manager.kubeconfig",
            "--service-account-private-key-file", f"{pki}/sa.key", "--root-ca-file", f"{pki}/ca.crt",
            "--use-service-account-credentials=true", "--leader-elect=false", "--port", "0",
            "--secure-port", "0", "--flex-volume-plugin-dir", str(self.work / "flex"),
            "--controllers", "*,-csrsigning,-csrapproving,-csrcleaner,-nodeipam,-route,-cloud-node-lifecycle,-service",
            "--node-monitor-period", "2s", "--profiling=false", "--v", "1"])
        self._spawn("kube-scheduler", [
            str(KUBE_BIN / "kube-scheduler"), "--kubeconfig", f"{pki}/scheduler.kubeconfig",
            "--leader-elect=false", "--port", "0", "--secure-port", "0", "--profiling=false", "--v", "1"])
        self._spawn("kubelet", [
            str(KUBE_BIN / "kubelet"), "--config", str(self.work / "kubelet" / "config.yaml"),
            "--kubeconfig", f"{pki}/kubelet.kubeconfig", "--container-runtime", "remote",
            "--container-runtime-endpoint", f"unix://{self.containerd_socket}",
            "--node-ip", NODE_IP, "--hostname-override", NODE_NAME, "--root-dir", str(self.work / "kubelet"),
            "--cert-dir", str(self.work / "kubelet" / "pki"), "--v", "1"])
        self.save_state(owner)
        self._wait(self._node_ready, "the node to be Ready", timeout, "kubelet")
        self._wait(lambda: self.kubectl("get", "serviceaccount", "default", check=False, timeout=10).returncode == 0,
                   "the default service account", timeout, "kube-controller-manager")
        self.timings["node_ready"] = time.monotonic() - begin

    def _node_ready(self) -> bool:
        out = self.kubectl("get", "node", NODE_NAME, "-o",
                           "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.spec.taints}",
                           check=False, timeout=10).stdout
        return out.startswith("True") and "not-ready" not in out

    def _wait(self, ready: object, what: str, timeout: float, log: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [name for name, pid in self.processes.items() if _process_exited(pid)]
            if dead:
                raise RuntimeError(f"waiting for {what}: {', '.join(dead)} exited; "
                                   f"{dead[0]} log tail:\n{self.log(dead[0])[-3000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}; {log} log tail:\n"
                           f"{self.log(log)[-3000:]}")

    def _spawn(self, name: str, argv: Sequence[str], in_node: bool = True) -> int:
        """A process of the node, in the node's cgroup, its output in logs/NAME.log."""
        procs_files = [str(d / "node" / "cgroup.procs") for d in self._cgroup_dirs()]
        with open(self.work / "logs" / f"{name}.log", "ab") as out:
            child = subprocess.Popen(self.in_node(*argv) if in_node else list(argv), stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.work / "home")},
                                     preexec_fn=lambda: _join_cgroups(procs_files))
        _REAPED.pop(child.pid, None)
        _CHILDREN[child.pid] = child
        self.processes[name] = child.pid
        return child.pid

    # --- configuration -----------------------------------------------------------------------------

    def _write_configs(self) -> None:
        w = self.work
        self.cni_bin.mkdir(parents=True, exist_ok=True)
        self.cni_conf.mkdir(parents=True, exist_ok=True)
        for plugin in sorted(CNI_DIR.iterdir()):
            link = self.cni_bin / plugin.name
            if not link.exists():
                link.symlink_to(plugin)
        (self.cni_conf / "10-iik.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "iik",
            "plugins": [{"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": str(w / "cni" / "ipam"),
                                  "ranges": [[{"subnet": POD_SUBNET, "gateway": POD_GATEWAY,
                                               "rangeStart": "198.51.100.10", "rangeEnd": "198.51.100.250"}]]}}],
        }, indent=2) + "\n")
        c = w / "containerd"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (c / "config.toml").write_text(f"""version = 2
root = "{c}/root"
state = "{c}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{self.containerd_socket}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{c}/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{c}/runc"
  BinaryName = "{shutil.which('runc') or '/usr/sbin/runc'}"
[{cri}.cni]
  bin_dir = "{self.cni_bin}"
  conf_dir = "{self.cni_conf}"
  max_conf_num = 1
""")
        for key, value in KUBELET_SYSCTLS.items():
            (w / "sysctl" / key.replace("/", ".")).write_text(f"{value}\n")
        binds = "\n".join(f"mount --bind {w}/sysctl/{key.replace('/', '.')} /proc/sys/{key}\n"
                          f"mount -o remount,bind,ro /proc/sys/{key}" for key in KUBELET_SYSCTLS)
        # Runs as the first process of the new namespaces, then becomes containerd.
        (c / "namespaces.sh").write_text(f"""set -eu
ip link set lo up
ip addr add {NODE_IP}/32 dev lo
# sysfs of this network namespace, with the host's cgroup hierarchies kept.
mount --rbind /sys/fs/cgroup {w}/mnt/cgroup
mount -t sysfs sysfs /sys
mount --move {w}/mnt/cgroup /sys/fs/cgroup
# Paths the kubelet, containerd's shims and libcni hard-code.
mount -t tmpfs -o mode=755,size=64m tmpfs /run
mount -t tmpfs -o mode=755,size=256m tmpfs /var/log
mount -t overlay overlay -o lowerdir=/var/lib,upperdir={w}/mnt/varlib-up,workdir={w}/mnt/varlib-work /var/lib
# The node's CNI dirs where a DaemonSet's hostPath volumes look for them (/opt/cni/bin,
# /etc/cni/net.d): overlays on /etc and /opt give the mount points, binds the node's own dirs.
mount -t overlay overlay -o lowerdir=/etc,upperdir={w}/mnt/etc-up,workdir={w}/mnt/etc-work /etc
mkdir -p {w}/mnt/opt-up/cni/bin
mount -t overlay overlay -o lowerdir=/opt,upperdir={w}/mnt/opt-up,workdir={w}/mnt/opt-work /opt
mkdir -p /etc/cni/net.d
mount --bind {self.cni_bin} /opt/cni/bin
mount --bind {self.cni_conf} /etc/cni/net.d
{binds}
exec containerd --config {c}/config.toml
""")
        (w / "kubelet" / "config.yaml").write_text(f"""apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzPort: 0
tlsCertFile: {w}/pki/kubelet-serving.crt
tlsPrivateKeyFile: {w}/pki/kubelet-serving.key
authentication:
  x509:
    clientCAFile: {w}/pki/ca.crt
  webhook:
    enabled: false
  anonymous:
    enabled: false
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: /{self.cgroup}
enforceNodeAllocatable: []
failSwapOn: false
makeIPTablesUtilChains: false
oomScoreAdj: 0
resolvConf: ""
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 5s
volumePluginDir: {w}/volume-plugins
serializeImagePulls: false
""")

    # --- cgroups -------------------------------------------------------------------------------

    def _cgroup_dirs(self) -> list[Path]:
        """The node's cgroup in every v1 hierarchy (named ones included)."""
        return [h / self.cgroup for h in cgroup_hierarchies()]

    def _make_cgroups(self) -> None:
        for d in self._cgroup_dirs():
            for sub in (d, d / "node"):
                sub.mkdir(exist_ok=True)
                if d.parent.name == "cpuset":
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        (sub / knob).write_text((sub.parent / knob).read_text())

    def _start_containerd(self) -> None:
        self._spawn("containerd", ["unshare", "--net", "--mount", "--propagation", "slave", "--",
                                   "sh", str(self.work / "containerd" / "namespaces.sh")], in_node=False)
        self._wait(lambda: self.containerd_socket.exists(), "containerd's socket", 30, "containerd")


_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_REAPED: dict[int, int] = {}


def _process_exited(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is not None
    return _start_time(pid) is None


def _join_cgroups(procs_files: list[str]) -> None:
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def cgroup_hierarchies() -> list[Path]:
    """The mounted v1 cgroup hierarchies (and a unified one, if mounted beside them)."""
    if not CGROUP_FS.is_dir():
        return []
    return sorted(p for p in CGROUP_FS.iterdir() if p.is_dir() and (p / "cgroup.procs").exists())


def _walk_cgroups(top: Path) -> Iterator[Path]:
    """top and every cgroup below it, deepest first."""
    for dirpath, _, _ in sorted(os.walk(top, topdown=False), key=lambda e: -e[0].count("/")):
        yield Path(dirpath)


def _pids_in(cgroup: str) -> set[int]:
    pids: set[int] = set()
    for h in cgroup_hierarchies():
        top = h / cgroup
        if not top.is_dir():
            continue
        for d in _walk_cgroups(top):
            try:
                pids.update(int(line) for line in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
    return pids


def teardown(work: Path, cgroup: str, processes: dict[str, int] | None = None, timeout: float = 30) -> list[str]:
    """Kills the node's processes by pid, removes its cgroups and its work directory.

    Returns what could not be removed (empty on success)."""
    # The control plane first, politely: the kubelet and the API server stop talking to each other.
    # Only pids still in the node's cgroup: a recorded pid may have been reused since.
    members = _pids_in(cgroup)
    for name in ("kubelet", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
        pid = (processes or {}).get(name)
        if pid in members:
            _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while True:
        pids = _pids_in(cgroup)
        if not pids:
            break
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        _reap_children()
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    _reap_children()
    left: list[str] = [f"process {pid} in cgroup {cgroup}" for pid in sorted(_pids_in(cgroup))]
    for h in cgroup_hierarchies():
        top = h / cgroup
        if not top.is_dir():
            continue
        for d in _walk_cgroups(top):
            for attempt in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if attempt == 49:
                        left.append(f"cgroup {d}")
                    time.sleep(0.1)
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
        if work.exists():
            left.append(f"directory {work}")
    with contextlib.suppress(OSError):  # the base too, once no node uses it
        work.parent.rmdir()
    return left


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap_children() -> None:
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            _REAPED[pid] = child.returncode
            del _CHILDREN[pid]


def stop(node: Node) -> list[str]:
    """Removes the node; with $ISTIO_INIT_KUBE_KEEP_LOGS set, its logs are copied there first."""
    keep = os.environ.get("ISTIO_INIT_KUBE_KEEP_LOGS")
    if keep and (node.work / "logs").is_dir():
        shutil.copytree(node.work / "logs", Path(keep) / node.node_id, dirs_exist_ok=True)
    return teardown(node.work, node.cgroup, node.processes)


def leftovers(node_id: str | None = None) -> list[str]:
    """What of any node (or of one node) is still on the machine: cgroups and work directories."""
    found: list[str] = []
    prefix = CGROUP_PREFIX + (node_id or "")
    for h in cgroup_hierarchies():
        found += [str(d) for d in h.iterdir() if d.is_dir() and d.name.startswith(prefix)]
    if WORK_BASE.is_dir():
        found += [str(d) for d in WORK_BASE.iterdir() if node_id is None or d.name == node_id]
    return found


def cleanup_stale(everything: bool = False) -> list[str]:
    """Removes the nodes whose owner process is gone (all nodes with everything=True).

    Also finds a node that crashed before writing its state: its cgroups name it. Returns the ids
    removed."""
    ids: set[str] = set()
    if WORK_BASE.is_dir():
        ids.update(d.name for d in WORK_BASE.iterdir() if d.is_dir())
    for h in cgroup_hierarchies():
        ids.update(d.name[len(CGROUP_PREFIX):] for d in h.iterdir()
                   if d.is_dir() and d.name.startswith(CGROUP_PREFIX))
    removed = []
    for node_id in sorted(ids):
        work = WORK_BASE / node_id
        processes: dict[str, int] = {}
        try:
            state = json.loads((work / "state.json").read_text())
            processes = state.get("processes", {})
            owner, owner_start = state.get("owner"), state.get("owner_start")
            if not everything and (owner is None or _alive(owner, owner_start)):
                continue
        except (OSError, ValueError):
            pass
        left = teardown(work, CGROUP_PREFIX + node_id, processes)
        if left:
            raise RuntimeError(f"node {node_id}: could not remove {'; '.join(left)}")
        removed.append(node_id)
    return removed


def _make_pki(pki: Path) -> None:
    """A CA and the node's certificates (EC P-256), made with openssl."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl_cert(pki, "ca", "istio-init-kube-ca", None, ca=True)
    certs = {
        "apiserver": ("kube-apiserver", None, "serverAuth", [f"IP:{NODE_IP}", "IP:127.0.0.1", f"IP:{SERVICE_IP}",
                                                            "DNS:kubernetes", "DNS:kubernetes.default",
                                                            "DNS:kubernetes.default.svc", "DNS:localhost"]),
        "apiserver-kubelet": ("kube-apiserver-kubelet-client", "system:masters", "clientAuth", []),
        "admin": ("admin", "system:masters", "clientAuth", []),
        "controller-manager": ("system:kube-controller-manager", None, "clientAuth", []),
        "scheduler": ("system:kube-scheduler", None, "clientAuth", []),
        "kubelet": (f"system:node:{NODE_NAME}", "system:nodes", "clientAuth", []),
        "kubelet-serving": (NODE_NAME, None, "serverAuth", [f"IP:{NODE_IP}", f"DNS:{NODE_NAME}"]),
    }
    for name, (cn, org, usage, sans) in certs.items():
        _openssl_cert(pki, name, cn, org, usage=usage, sans=sans)
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pki / "sa.key")],
                   check=True, capture_output=True)
    for name in ("admin", "controller-manager", "scheduler", "kubelet"):
        (pki / f"{name}.kubeconfig").write_text(f"""apiVersion: v1
kind: Config
clusters:
- name: node
  cluster:
    server: https://{NODE_IP}:6443
    certificate-authority: {pki}/ca.crt
users:
- name: {name}
  user:
    client-certificate: {pki}/{name}.crt
    client-key: {pki}/{name}.key
contexts:
- name: node
  context: {{cluster: node, user: {name}}}
current-context: node
""")


def _openssl_cert(pki: Path, name: str, cn: str, org: str | None, ca: bool = False, usage: str = "",
                  sans: Sequence[str] = ()) -> None:
    ext = ["basicConstraints = critical,CA:TRUE", "keyUsage = critical,keyCertSign,cRLSign"] if ca else [
        "basicConstraints = critical,CA:FALSE", "keyUsage = critical,digitalSignature",
        f"extendedKeyUsage = {usage}"]
    if sans:
        ext.append("subjectAltName = " + ",".join(sans))
    subject = ([f"O = {org}"] if org else []) + [f"CN = {cn}"]
    cnf = pki / f"{name}.cnf"
    cnf.write_text("[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ext\n[dn]\n"
                   + "\n".join(subject) + "\n[ext]\n" + "\n".join(ext) + "\n")
    argv = ["openssl", "req", "-new", "-x509", "-config", str(cnf), "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(pki / f"{name}.key"), "-out",
            str(pki / f"{name}.crt"), "-days", "7"]
    if not ca:
        argv += ["-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key")]
    subprocess.run(argv, check=True, capture_output=True)


def start_node(owner: int | None, timeout: float = 120) -> Node:
    """A started node; on failure everything of it is removed again and the error re-raised."""
    node = Node.new()
    try:
        node.start(owner, timeout)
    except BaseException:
        logs = {name: node.log(name)[-2000:] for name in node.processes}
        left = stop(node)
        if left:
            print(f"kubenode: left behind: {left}", file=sys.stderr)
        if logs:
            print("kubenode: logs of the failed start:\n" + "\n".join(f"--- {k}\n{v}" for k, v in logs.items()),
                  file=sys.stderr)
        raise
    return node


def load(node_id: str) -> Node:
    work = WORK_BASE / node_id
    state = json.loads((work / "state.json").read_text())
    return Node(node_id, work, processes=state["processes"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kube-node", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="say what this machine lacks to run a node")
    sub.add_parser("start", help="start a node; prints its id (stop it with `stop ID`)")
    p_stop = sub.add_parser("stop", help="stop a node and remove everything of it")
    p_stop.add_argument("node_id")
    p_clean = sub.add_parser("cleanup", help="remove nodes whose owner died (with --all: every node)")
    p_clean.add_argument("--all", action="store_true")
    sub.add_parser("leftovers", help="list node cgroups and work directories still on the machine")
    p_kubectl = sub.add_parser("kubectl", help="run kubectl against a node")
    p_kubectl.add_argument("node_id")
    p_kubectl.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "check":
        missing = missing_parts()
        print("\n".join(f"missing: {m}" for m in missing) or "ready")
        return 1 if missing else 0
    if args.command == "start":
        missing = missing_parts()
        if missing:
            print("kube-node: cannot start: " + "; ".join(missing), file=sys.stderr)
            return 1
        node = start_node(owner=None)
        print(node.node_id)
        print(f"kube-node: node {node.node_id} Ready in {node.timings['node_ready']:.1f}s "
              f"(API server ready in {node.timings['apiserver_ready']:.1f}s); "
              f"scripts/kube-node kubectl {node.node_id} get pods -A", file=sys.stderr)
        return 0
    if args.command == "stop":
        left = stop(load(args.node_id))
        if left:
            print("kube-node: left behind: " + "; ".join(left), file=sys.stderr)
            return 1
        return 0
    if args.command == "cleanup":
        for node_id in cleanup_stale(everything=args.all):
            print(f"kube-node: removed node {node_id}", file=sys.stderr)
        return 0
    if args.command == "leftovers":
        found = leftovers()
        print("\n".join(found))
        return 1 if found else 0
    result = load(args.node_id).kubectl(*args.args, check=False, timeout=300)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
