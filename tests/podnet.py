"""A pod on a wire: two namespaces, a veth pair, istio-init's rules and real sockets.

Text that matches the golden files does not prove a connection reaches the
proxy, so the traffic tests build what a kubelet would: a "pod" namespace
joined by a veth pair to a "peer" namespace (the rest of the cluster), apply
istio-init in the pod, and run small listeners:

- a stand-in proxy (uid/gid 1337) on the capture ports, which answers every
  connection with the port it accepted on, its local address and the original
  destination read with SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST;
- the application (uid 1000) on its own ports;
- a listener in the peer namespace that says "peer".

A client runs inside a namespace as a given uid/gid (optionally from a given
source address) and returns what the server answered, so a test reads
"who answered, on which port, and what did it think the destination was".

Every helper process is started and stopped by pid, every socket has a
timeout, every loop is bounded, and the namespaces are removed afterwards.
Addresses are documentation ranges only (192.0.2.0/24, 198.51.100.0/24,
2001:db8::/32) plus loopback, all inside namespaces this module created.

This file is also the helper program: `python podnet.py serve ...` and
`python podnet.py connect ...` run inside a namespace via nsenter.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve()
PYTHON = sys.executable

POD_V4, PEER_V4 = "192.0.2.10", "192.0.2.20"
POD_V6, PEER_V6 = "2001:db8::10", "2001:db8::20"
# Extra peer addresses, reached through the peer: one inside -i, one inside -x.
PEER_SERVICE_V4, PEER_EXCLUDED_V4 = "198.51.100.20", "198.51.100.200"
PEER_ROUTED = "198.51.100.0/24"

PROXY_UID = 1337
APP_UID = 1000
OTHER_UID = 2000  # in no -u/-g list

OUTBOUND_PORT, INBOUND_PORT, DNS_PORT = 15001, 15006, 15053
APP_PORT, EXCLUDED_APP_PORT = 8080, 9000

SO_ORIGINAL_DST = 80  # SOL_IP level, linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # SOL_IPV6 level, linux/netfilter_ipv6/ip6_tables.h
SERVER_LIFETIME = 600.0  # a forgotten server exits on its own
IO_TIMEOUT = 3.0


# --------------------------------------------------------------------------- helper programs


def _original_dst(conn: socket.socket) -> list[Any] | None:
    """The pre-NAT destination of an accepted connection, or None without conntrack NAT."""
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, packed = struct.unpack_from("!2xH4s", raw)
            return [str(ipaddress.IPv4Address(packed)), port]
        raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return [str(ipaddress.IPv6Address(packed)), port]
    except OSError:
        return None


def _drop_privileges(uid: int | None, gid: int | None) -> None:
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def _listen(family: int, kind: int, port: int, transparent: bool) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        # TPROXY delivers to sockets that may own non-local addresses.
        level = socket.SOL_IP if family == socket.AF_INET else socket.IPPROTO_IPV6
        option = socket.IP_TRANSPARENT if family == socket.AF_INET else 75  # IPV6_TRANSPARENT
        sock.setsockopt(level, option, 1)
    sock.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    sock.setblocking(False)
    return sock


def serve(tag: str, tcp: Sequence[int], udp: Sequence[int], uid: int | None, gid: int | None,
          transparent: bool) -> None:
    """Answer every TCP connection and UDP datagram with one JSON line, until killed."""
    selector = selectors.DefaultSelector()
    for family in (socket.AF_INET, socket.AF_INET6):
        for port in tcp:
            selector.register(_listen(family, socket.SOCK_STREAM, port, transparent), selectors.EVENT_READ,
                              ("tcp", port))
        for port in udp:
            selector.register(_listen(family, socket.SOCK_DGRAM, port, transparent), selectors.EVENT_READ,
                              ("udp", port))
    _drop_privileges(uid, gid)
    print("ready", flush=True)
    deadline = time.monotonic() + SERVER_LIFETIME
    while time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1.0):
            proto, port = key.data
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                if proto == "tcp":
                    conn, peer = sock.accept()
                    with conn:
                        conn.settimeout(IO_TIMEOUT)
                        answer = {"tag": tag, "proto": "tcp", "listener": port, "local": list(conn.getsockname()[:2]),
                                  "orig": _original_dst(conn), "src": list(peer[:2]), "uid": os.getuid()}
                        conn.sendall(json.dumps(answer).encode() + b"\n")
                else:
                    _, peer = sock.recvfrom(2048)
                    answer = {"tag": tag, "proto": "udp", "listener": port, "src": list(peer[:2]),
                              "uid": os.getuid()}
                    sock.sendto(json.dumps(answer).encode() + b"\n", peer)
            except OSError:
                continue


def connect(dst: str, port: int, proto: str, src: str | None, timeout: float) -> dict[str, Any]:
    """One connection (or datagram); returns the server's JSON answer or {"error": ...}."""
    family = socket.AF_INET6 if ipaddress.ip_address(dst).version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        try:
            if src:
                sock.bind((src, 0))
            if kind == socket.SOCK_STREAM:
                sock.connect((dst, port))
                data = b""
                for _ in range(64):  # bounded: the answer is one short line
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            else:
                sock.sendto(b"query", (dst, port))
                data, _ = sock.recvfrom(4096)
        except OSError as exc:
            return {"error": type(exc).__name__, "detail": str(exc)}
    return json.loads(data.decode())


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="podnet")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tag", required=True)
    s.add_argument("--tcp", default="")
    s.add_argument("--udp", default="")
    s.add_argument("--uid", type=int)
    s.add_argument("--gid", type=int)
    s.add_argument("--transparent", action="store_true")
    c = sub.add_parser("connect")
    c.add_argument("--dst", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--proto", default="tcp")
    c.add_argument("--src")
    c.add_argument("--uid", type=int)
    c.add_argument("--gid", type=int)
    c.add_argument("--timeout", type=float, default=IO_TIMEOUT)
    args = parser.parse_args(argv)
    ports = lambda text: [int(p) for p in text.split(",") if p]  # noqa: E731
    if args.command == "serve":
        serve(args.tag, ports(args.tcp), ports(args.udp), args.uid, args.gid, args.transparent)
    else:
        _drop_privileges(args.uid, args.gid)
        print(json.dumps(connect(args.dst, args.port, args.proto, args.src, args.timeout)))


# --------------------------------------------------------------------------- the harness


@dataclass(frozen=True)
class Answer:
    """What a client saw: who answered (tag), on which listener port, and the original destination."""

    tag: str | None
    listener: int | None = None
    orig: tuple[str, int] | None = None
    local: tuple[str, int] | None = None
    error: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Answer":
        if "error" in data:
            return cls(None, error=f"{data['error']}: {data.get('detail', '')}", raw=data)
        return cls(data["tag"], data["listener"], tuple(data["orig"]) if data.get("orig") else None,
                   tuple(data["local"]) if data.get("local") else None, raw=data)


@dataclass
class Server:
    namespace: str
    process: subprocess.Popen

    def stop(self) -> None:
        """Stop this one process by its pid, and reap it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
        if self.process.stdout:
            self.process.stdout.close()


def nsenter(namespace: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{namespace}"]


def start_server(namespace: str, tag: str, tcp: Sequence[int] = (), udp: Sequence[int] = (),
                 uid: int | None = None, gid: int | None = None, transparent: bool = False) -> Server:
    """Start one listener process inside `namespace`; returns once it listens."""
    argv = [*nsenter(namespace), PYTHON, str(HERE), "serve", "--tag", tag,
            "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp))]
    if uid is not None:
        argv += ["--uid", str(uid)]
    if gid is not None:
        argv += ["--gid", str(gid)]
    if transparent:
        argv.append("--transparent")
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    server = Server(namespace, process)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    ready = selector.select(timeout=10) and process.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
    selector.close()
    if not ready:
        server.stop()
        raise RuntimeError(f"listener {tag} in {namespace} did not start")
    return server


def run_client(namespace: str, dst: str, port: int, uid: int | None = None, gid: int | None = None,
               src: str | None = None, proto: str = "tcp", timeout: float = 2.0) -> Answer:
    """One connection from inside `namespace` as uid/gid; what answered it."""
    argv = [*nsenter(namespace), PYTHON, str(HERE), "connect", "--dst", dst, "--port", str(port),
            "--proto", proto, "--timeout", str(timeout)]
    for flag, value in (("--uid", uid), ("--gid", gid), ("--src", src)):
        if value is not None:
            argv += [flag, str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"client failed: {done.stderr.strip()}")
    return Answer.from_json(json.loads(done.stdout))


def _create_namespace(name: str) -> None:
    from pyroute2 import NetNS, netns

    netns.create(name)
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")


def _write_sysctl(namespace: str, key: str, value: str) -> None:
    subprocess.run([*nsenter(namespace), "sysctl", "-q", "-w", f"{key}={value}"], check=True,
                   capture_output=True, timeout=10)


def wire(pod: str, peer: str) -> None:
    """Two namespaces and a veth pair with the documentation addresses; IPv6 usable at once."""
    from pyroute2 import IPRoute, NetNS

    _create_namespace(pod)
    _create_namespace(peer)
    for name in (pod, peer):
        # No duplicate address detection: addresses are usable immediately.
        _write_sysctl(name, "net.ipv6.conf.all.accept_dad", "0")
        _write_sysctl(name, "net.ipv6.conf.default.accept_dad", "0")
    with IPRoute() as ipr:
        ipr.link("add", ifname=f"v{os.getpid()}a", kind="veth", peer=f"v{os.getpid()}b")
        for ifname, target in ((f"v{os.getpid()}a", pod), (f"v{os.getpid()}b", peer)):
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], net_ns_fd=target)
    nodad = 0x02  # IFA_F_NODAD
    for name, ifname, v4, v6 in ((pod, f"v{os.getpid()}a", POD_V4, POD_V6),
                                 (peer, f"v{os.getpid()}b", PEER_V4, PEER_V6)):
        with NetNS(name) as ns:
            index = ns.link_lookup(ifname=ifname)[0]
            ns.link("set", index=index, ifname="eth0")
            # IPv4 first: the pod's first address decides nothing here (--ipv6 is pinned).
            ns.addr("add", index=index, address=v4, prefixlen=24)
            ns.addr("add", index=index, address=v6, prefixlen=64, flags=nodad)
            ns.link("set", index=index, state="up")
            if name == peer:
                for extra in (PEER_SERVICE_V4, PEER_EXCLUDED_V4):
                    ns.addr("add", index=index, address=extra, prefixlen=32)
            else:
                ns.route("add", dst=PEER_ROUTED, gateway=PEER_V4, oif=index)


def remove_namespace(name: str) -> None:
    from pyroute2 import netns

    if name in netns.listnetns():
        netns.remove(name)


def apply_istio_init(namespace: str, args: Sequence[str], ipv6: bool) -> None:
    """Install istio-init's rules in the pod: the ONE place the harness applies rules.

    This is the real command (`istio-init FLAGS --network-namespace ...`), so the
    traffic tests cover the apply path too. The legacy backend is pinned because
    the tests read and break rules with the iptables-legacy tools.
    """
    argv = [PYTHON, "-m", "istio_init", *args, "--ipv6", "true" if ipv6 else "false", "--iptables-backend",
            "legacy", "--network-namespace", f"/run/netns/{namespace}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"istio-init apply failed ({done.returncode}): {done.stderr.strip()}")


@dataclass
class Pod:
    """A pod namespace wired to a peer, with istio-init applied and listeners running."""

    name: str
    peer: str
    args: tuple[str, ...]
    ipv6: bool
    servers: list[Server] = field(default_factory=list)

    @classmethod
    def up(cls, args: Sequence[str], ipv6: bool = True, listeners: bool = True, tag: str = "pod",
           apply: bool = True) -> "Pod":
        suffix = f"{os.getpid()}-{tag}"
        pod = cls(f"iit-{suffix}", f"iip-{suffix}", tuple(args), ipv6)
        try:
            wire(pod.name, pod.peer)
            if apply:
                apply_istio_init(pod.name, args, ipv6)
            if listeners:
                pod.start_listeners()
        except BaseException:
            pod.down()
            raise
        return pod

    def start_listeners(self) -> None:
        self.servers.append(start_server(self.name, "proxy", tcp=(OUTBOUND_PORT, INBOUND_PORT, DNS_PORT),
                                         udp=(DNS_PORT,), uid=PROXY_UID, gid=PROXY_UID, transparent=True))
        self.servers.append(start_server(self.name, "app", tcp=(APP_PORT, EXCLUDED_APP_PORT, 7000, 7001),
                                         uid=APP_UID, gid=APP_UID))
        self.servers.append(start_server(self.peer, "peer", tcp=(APP_PORT, 53, 7000, 7001), udp=(53,)))

    def down(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()
        remove_namespace(self.name)
        remove_namespace(self.peer)

    def outbound(self, dst: str, port: int, uid: int = APP_UID, gid: int | None = None, **kw: Any) -> Answer:
        """A connection from the pod, as `uid` (gid defaults to the uid)."""
        return run_client(self.name, dst, port, uid=uid, gid=uid if gid is None else gid, **kw)

    def inbound(self, dst: str, port: int, **kw: Any) -> Answer:
        """A connection from the peer to the pod."""
        return run_client(self.peer, dst, port, **kw)

    def iptables(self, *argv: str, family: int = 4) -> None:
        tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
        subprocess.run([*nsenter(self.name), tool, "-w", *argv], check=True, capture_output=True, timeout=30)

    def save(self, family: int = 4) -> str:
        tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
        return subprocess.run([*nsenter(self.name), tool], check=True, capture_output=True, text=True,
                              timeout=30).stdout


if __name__ == "__main__":
    _main(sys.argv[1:])
