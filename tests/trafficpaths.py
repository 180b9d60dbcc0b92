"""The capture paths the traffic tests prove on the wire, and how a path is connected, traced and judged.

One table of paths (PATHS, for the flag sets of CONFIGS) drives test_traffic.py
and, with native nftables, test_traffic_nft.py: each path names the
connection, where it must land, and the rule whose removal (or move) must
change that (its Breakage).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from clirun import invoke
from podnet import (APP_UID, OTHER_UID, PEER_EXCLUDED_V4, PEER_SERVICE_V4, PEER_V4, PEER_V6, POD_V4, POD_V6,
                    PROXY_UID, Answer, Pod)

# Dual-stack REDIRECT pod: every outbound knob, DNS capture on.
REDIRECT_ARGS = ("-u", "1337", "-m", "REDIRECT", "-b", "*", "-d", "9000",
                 "-i", "198.51.100.0/24,2001:db8::/64", "-x", "198.51.100.128/25",
                 "-q", "7000", "-o", "7001", "--redirect-dns")
# IPv4 TPROXY pod capturing all outbound (so only the loopback rules keep 127.0.0.1 out).
TPROXY_ARGS = ("-u", "1337", "-m", "TPROXY", "-b", "*", "-d", "9000", "-i", "*")
CONFIGS = {"redirect": (REDIRECT_ARGS, True), "tproxy": (TPROXY_ARGS, False)}


@dataclass(frozen=True)
class Breakage:
    """Rules to delete (or move to the end of their chain) to break a path on purpose."""

    rules: tuple[str, ...]  # "TABLE CHAIN SPEC", as iptables-save spells the rule
    move_to_end: bool = False
    family: int = 4


@dataclass(frozen=True)
class Path:
    name: str
    config: str
    direction: str
    dst: str
    port: int
    expect: tuple[str, int]  # (who answers, on which listener port)
    broken: tuple[str, int]  # the same after `breakage`
    breakage: Breakage
    uid: int = APP_UID
    gid: int | None = None
    src: str | None = None
    proto: str = "tcp"
    orig: bool = True  # check the original destination survived capture

    @property
    def captured(self) -> bool:
        return self.expect[0] == "proxy"

    @property
    def out_interface(self) -> str | None:
        local = self.dst in (POD_V4, POD_V6) or self.dst.startswith("127.") or self.dst == "::1"
        return "lo" if self.direction == "out" and local else None


def _nat(*rules: str, family: int = 4, move: bool = False) -> Breakage:
    return Breakage(tuple(f"nat {rule}" for rule in rules), move, family)


PATHS = (
    Path("inbound_app_port_captured", "redirect", "in", POD_V4, 8080, ("proxy", 15006), ("app", 8080),
         _nat("ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")),
    Path("inbound_excluded_port_not_captured", "redirect", "in", POD_V4, 9000, ("app", 9000), ("proxy", 15006),
         _nat("ISTIO_INBOUND -p tcp -m tcp --dport 9000 -j RETURN", move=True)),
    Path("outbound_app_to_peer_captured", "redirect", "out", PEER_SERVICE_V4, 8080, ("proxy", 15001),
         ("peer", 8080), _nat("ISTIO_OUTPUT -d 198.51.100.0/24 -j ISTIO_REDIRECT")),
    Path("outbound_proxy_uid_not_captured", "redirect", "out", PEER_SERVICE_V4, 8080, ("peer", 8080),
         ("proxy", 15001), _nat("ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN"),
         uid=PROXY_UID, gid=OTHER_UID),
    Path("outbound_proxy_gid_not_captured", "redirect", "out", PEER_SERVICE_V4, 8080, ("peer", 8080),
         ("proxy", 15001), _nat("ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"),
         uid=OTHER_UID, gid=PROXY_UID),
    # Three rules keep app->127.0.0.1 local; any one of them is enough, so all three go.
    Path("app_to_localhost_not_captured", "tproxy", "out", "127.0.0.1", 8080, ("app", 8080), ("proxy", 15001),
         _nat("ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
              "ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
              "ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN")),
    Path("inbound_passthrough_from_127_0_0_6_not_captured", "redirect", "out", POD_V4, 8080, ("app", 8080),
         ("proxy", 15006), _nat("ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN"),
         uid=PROXY_UID, gid=PROXY_UID, src="127.0.0.6"),
    Path("excluded_cidr_not_captured", "redirect", "out", PEER_EXCLUDED_V4, 8080, ("peer", 8080), ("proxy", 15001),
         _nat("ISTIO_OUTPUT -d 198.51.100.128/25 -j RETURN", move=True)),
    Path("excluded_outbound_port_not_captured", "redirect", "out", PEER_SERVICE_V4, 7001, ("peer", 7001),
         ("proxy", 15001), _nat("ISTIO_OUTPUT -p tcp -m tcp --dport 7001 -j RETURN")),
    Path("outbound_port_captured_outside_cidrs", "redirect", "out", PEER_V4, 7000, ("proxy", 15001), ("peer", 7000),
         _nat("ISTIO_OUTPUT -p tcp -m tcp --dport 7000 -j ISTIO_REDIRECT")),
    Path("tproxy_inbound_keeps_original_destination", "tproxy", "in", POD_V4, 8080, ("proxy", 15006),
         ("app", 8080), Breakage(("mangle ISTIO_INBOUND -p tcp -j ISTIO_TPROXY",))),
    Path("ipv6_inbound_captured", "redirect", "in", POD_V6, 8080, ("proxy", 15006), ("app", 8080),
         _nat("ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT", family=6)),
    Path("ipv6_outbound_captured", "redirect", "out", PEER_V6, 8080, ("proxy", 15001), ("peer", 8080),
         _nat("ISTIO_OUTPUT -d 2001:db8::/64 -j ISTIO_REDIRECT", family=6)),
    Path("ipv6_proxy_uid_not_captured", "redirect", "out", PEER_V6, 8080, ("peer", 8080), ("proxy", 15001),
         _nat("ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN", family=6), uid=PROXY_UID, gid=OTHER_UID),
    Path("dns_udp_captured", "redirect", "out", PEER_SERVICE_V4, 53, ("proxy", 15053), ("peer", 53),
         _nat("OUTPUT -p udp -m udp --dport 53 -j DNAT --to-destination 127.0.0.1:15053"), proto="udp",
         orig=False),
    Path("dns_tcp_captured", "redirect", "out", PEER_SERVICE_V4, 53, ("proxy", 15053), ("proxy", 15001),
         _nat("ISTIO_REDIRECT -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053")),
)


def connect(pod: Pod, path: Path) -> Answer:
    if path.direction == "in":
        return pod.inbound(path.dst, path.port, proto=path.proto)
    return pod.outbound(path.dst, path.port, uid=path.uid, gid=path.gid, src=path.src, proto=path.proto)


def trace_args(path: Path) -> list[str]:
    gid = path.uid if path.gid is None else path.gid
    args = ["--direction", path.direction, "--dst", path.dst, "--dport", str(path.port),
            "--protocol", path.proto, "--uid", str(path.uid), "--gid", str(gid), "--json"]
    if path.src:
        args += ["--src", path.src]
    if path.out_interface:
        args += ["--out-interface", path.out_interface]
    return args


def trace_plan(path: Path) -> dict:
    args, ipv6 = CONFIGS[path.config]
    result = invoke(["trace", *args, "--ipv6", "true" if ipv6 else "false", *trace_args(path)])
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def trace_live(pod: Pod, path: Path) -> dict:
    """`istio-init trace --live` in the pod (a subprocess: it enters the namespace)."""
    done = subprocess.run([sys.executable, "-m", "istio_init", "trace", "--live", "--iptables-backend", "legacy",
                           "--network-namespace", f"/run/netns/{pod.name}", *trace_args(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def assert_trace_agrees(trace: dict, answer: Answer) -> None:
    """The trace's verdict and the listener that answered tell the same story."""
    assert answer.error is None, answer.error
    if answer.tag == "proxy":
        assert trace["captured"], trace["outcome"]
        assert trace["to_port"] == answer.listener, trace["outcome"]
    else:
        assert not trace["captured"], trace["outcome"]


def outcome(answer: Answer) -> tuple[str | None, int | None]:
    return answer.tag, answer.listener


def assert_lands(path: Path, answer: Answer) -> None:
    """The connection ended where the path says, and a capturing proxy can tell where it was going."""
    assert outcome(answer) == path.expect, answer
    if path.captured and path.orig:
        seen = answer.local if path.config == "tproxy" and path.direction == "in" else answer.orig
        assert seen == (path.dst, path.port), answer
