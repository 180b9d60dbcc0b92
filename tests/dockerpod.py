"""A pod of real containers for the image tests: a pause container owning the network namespace,
the init container run in it as the kubelet would, a stand-in proxy, an application and a client.

Shared by test_pod_docker.py and test_pod_docker_cni.py. The `pod` fixture asks for a `variant`
fixture ("1.8" or "current", which image and args) that each test module provides. Every
container lives at most LIFETIME seconds, even if cleanup fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import pytest

IMAGE = os.environ.get("ISTIO_INIT_IMAGE", "istio-init:dev")
# The image built for current Istio (RULES_VERSION=current IMAGE=istio-init:current scripts/build-image).
CURRENT_IMAGE = os.environ.get("ISTIO_INIT_CURRENT_IMAGE", "istio-init:current")

# The seed's init container, as the kubelet runs it.
SEED_ARGS = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
             "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"]
# Current Istio's injected init container (docs/rules-current.md): the same, then its logging flag.
CURRENT_ARGS = [*SEED_ARGS, "--log_output_level=default:info"]
# variant -> (image, args): the seed's pod, and the same pod as current Istio injects it.
VARIANTS = {"1.8": (IMAGE, SEED_ARGS), "current": (CURRENT_IMAGE, CURRENT_ARGS)}
SEED_SECURITY = ["--user", "0:0", "--security-opt", "no-new-privileges",
                 "--cap-drop", "ALL", "--cap-add", "NET_ADMIN", "--cap-add", "NET_RAW"]

SUBNET = "198.51.100.0/24"
POD_IP = "198.51.100.10"
CLIENT_IP = "198.51.100.20"
APP_PORT = 8080
CLIENT_PORT = 9090
LIFETIME = 600  # seconds any container of this test lives at most, even if cleanup fails

# A listener: `python3 -c SERVER LABEL PORT...` answers every connection with one line,
# "LABEL <port it accepted on> <original destination ip:port>", the original destination
# read with SO_ORIGINAL_DST (getsockopt(SOL_IP, 80) gives a struct sockaddr_in).
SERVER = f"""
import select, socket, struct, sys, time
label, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
listeners = []
for port in ports:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(16)
    listeners.append(s)
print("ready", flush=True)
end = time.monotonic() + {LIFETIME}
while time.monotonic() < end:
    for s in select.select(listeners, [], [], 1)[0]:
        conn, _ = s.accept()
        conn.settimeout(5)
        try:
            raw = conn.getsockopt(socket.SOL_IP, 80, 16)
            original = "%s:%d" % (socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0])
        except OSError:
            original = "%s:%d" % conn.getsockname()
        conn.sendall(("%s %d %s\\n" % (label, s.getsockname()[1], original)).encode())
        conn.close()
"""

# `python3 -c CLIENT HOST PORT`: connect and print the one line the server answers.
CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.settimeout(5)
    print(s.makefile().readline().strip())
"""


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"docker {' '.join(args[:2])} ... failed ({result.returncode}): {result.stderr.strip()}")
    return result


def engine_problem(image: str = IMAGE) -> str | None:
    """Why this test cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker client on PATH (apt-get install docker.io)"
    try:
        info = docker("info", "--format", "{{.ServerVersion}}", timeout=15, check=False)
    except subprocess.TimeoutExpired:
        return "no Docker engine answers (`docker info` timed out); start one: scripts/docker-engine start"
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Docker engine answers ({why}); start one: scripts/docker-engine start"
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        return f"image {IMAGE} is missing (ISTIO_INIT_IMAGE); build it: scripts/build-image"
    if docker("image", "inspect", image, check=False).returncode != 0:
        return (f"image {image} is missing (ISTIO_INIT_CURRENT_IMAGE); build it: "
                f"RULES_VERSION=current IMAGE={image} scripts/build-image")
    return None


@dataclass
class Pod:
    """Names of everything this run created, so the finally block can remove exactly those."""

    run_id: str = field(default_factory=lambda: f"iit-{uuid.uuid4().hex[:10]}")
    containers: list[str] = field(default_factory=list)
    network: str | None = None

    def name(self, role: str) -> str:
        name = f"{self.run_id}-{role}"
        self.containers.append(name)
        return name

    @property
    def pause(self) -> str:
        return f"{self.run_id}-pause"

    def in_pod(self) -> list[str]:
        return ["--network", f"container:{self.pause}"]

    def start(self, role: str, *args: str) -> str:
        """A detached container; returns its name."""
        name = self.name(role)
        docker("run", "-d", "--name", name, *args)
        return name

    def start_server(self, role: str, label: str, *args: str, ports: tuple[int, ...]) -> str:
        name = self.start(role, *args, "--entrypoint", "python3", IMAGE,
                          "-c", SERVER, label, *map(str, ports))
        wait_ready(name)
        return name

    def init(self, role: str, image: str = IMAGE, args: list[str] = SEED_ARGS) -> subprocess.CompletedProcess:
        """The init container: the image with the seed's securityContext and args."""
        return docker("run", "--rm", "--name", self.name(role), *self.in_pod(), *SEED_SECURITY,
                      image, *args, timeout=120, check=False)

    def iptables_save(self, role: str) -> str:
        """What both iptables backends show in the pod (counters zeroed, comments dropped)."""
        out = docker("run", "--rm", "--name", self.name(role), *self.in_pod(), *SEED_SECURITY,
                     "--entrypoint", "sh", IMAGE, "-c",
                     "echo '# legacy'; iptables-legacy-save; echo '# nft'; iptables-nft-save").stdout
        lines = []
        for line in out.splitlines():
            if line.startswith("# legacy") or line.startswith("# nft") or not line.startswith("#"):
                lines.append(re.sub(r"\[\d+:\d+\]$", "[0:0]", line))
        return "\n".join(lines) + "\n"

    def nft_list(self, role: str) -> str:
        """`nft -s list ruleset` in the pod (stateless: no counters), with the image's own nft."""
        return docker("run", "--rm", "--name", self.name(role), *self.in_pod(), *SEED_SECURITY,
                      "--entrypoint", "nft", IMAGE, "-s", "list", "ruleset").stdout

    def start_processes(self) -> tuple[str, str, str]:
        """The stand-in proxy (uid 1337) and an app in the pod, a client outside it: their names."""
        proxy = self.start_server("proxy", "proxy", *self.in_pod(), "--user", "1337:1337", "--cap-drop", "ALL",
                                  ports=(15001, 15006))
        app = self.start_server("app", "app", *self.in_pod(), "--user", "1000:1000", "--cap-drop", "ALL",
                                ports=(APP_PORT,))
        client = self.start_server("client", "client", "--network", self.network or "", "--ip", CLIENT_IP,
                                   "--cap-drop", "ALL", ports=(CLIENT_PORT,))
        return proxy, app, client

    def remove(self) -> None:
        for name in reversed(self.containers):
            docker("rm", "-f", name, check=False)
        if self.network:
            docker("network", "rm", self.network, check=False)


def wait_ready(name: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        logs = docker("logs", name, check=False)
        if "ready" in logs.stdout:
            return
        state = docker("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
        if state == "false":
            break
        time.sleep(0.2)
    logs = docker("logs", name, check=False)
    pytest.fail(f"container {name} did not get ready:\n{logs.stdout}{logs.stderr}")


def connect(container: str, host: str, port: int) -> str:
    """What a connection from inside `container` to host:port is answered with."""
    result = docker("exec", container, "python3", "-c", CLIENT, host, str(port), timeout=30, check=False)
    assert result.returncode == 0, f"{container} -> {host}:{port} failed:\n{result.stderr}"
    return result.stdout.strip()


def check_traffic(proxy: str, app: str, client: str) -> None:
    """Where connections land: inbound on 15006, outbound on 15001, the proxy's own not captured."""
    # Inbound: the client's connection to the app lands on the inbound capture port.
    assert connect(client, POD_IP, APP_PORT) == f"proxy 15006 {POD_IP}:{APP_PORT}"
    # Outbound: the app's connection to the client lands on the outbound capture port.
    assert connect(app, CLIENT_IP, CLIENT_PORT) == f"proxy 15001 {CLIENT_IP}:{CLIENT_PORT}"
    # The proxy's own connections (uid 1337) are not captured: it reaches the client itself.
    assert connect(proxy, CLIENT_IP, CLIENT_PORT) == f"client {CLIENT_PORT} {CLIENT_IP}:{CLIENT_PORT}"


def nat_appends(save_text: str) -> list[str]:
    """The `-A` lines of every *nat table in iptables-save text."""
    rules, in_nat = [], False
    for line in save_text.splitlines():
        if line.startswith("*"):
            in_nat = line == "*nat"
        elif in_nat and line.startswith("-A "):
            rules.append(line)
    return rules


@pytest.fixture
def pod(variant: str) -> Iterator[Pod]:
    problem = engine_problem(VARIANTS[variant][0])
    if problem:
        pytest.skip(problem)
    pod = Pod()
    try:
        pod.network = f"{pod.run_id}-net"
        docker("network", "create", "--driver", "bridge", "--subnet", SUBNET, pod.network)
        pod.start("pause", "--network", pod.network, "--ip", POD_IP, "--cap-drop", "ALL",
                  "--entrypoint", "sleep", IMAGE, str(LIFETIME))
        yield pod
    finally:
        pod.remove()
