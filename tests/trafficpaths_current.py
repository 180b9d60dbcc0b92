"""The paths the current rule set adds, as test_traffic_current.py proves them on the wire: the flag
sets (CONFIGS), each path with the rule whose removal must change it, and the pods they run in.

Shared with test_traffic_current_nft.py, which runs the same paths with native nftables.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from clirun import clean_environ
from podnet import APP_UID, OTHER_UID, PEER_SERVICE_V4, PEER_V4, POD_V4, PROXY_UID, Answer, Pod

RESOLVER = PEER_SERVICE_V4  # the pod's nameserver: a peer address
EXCLUDED_GROUP = 3000
HOLD_PORT = 7100
HERE = Path(__file__).resolve().parent

CONFIGS = {
    # REDIRECT, DNS capture to the resolv.conf resolver, one excluded owner group, default loopback CIDR.
    "dns": (("-u", "1337", "-b", "*", "-d", "9000", "-i", "*", "--redirect-dns"),
            {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": str(EXCLUDED_GROUP)}),
    "capture_all": (("-u", "1337", "-i", "*", "--redirect-dns", "--capture-all-dns"), {}),
    "exclude_nic": (("-u", "1337", "-b", "*", "-i", "*", "-c", "eth0"), {}),
    # -o 53 excludes DNS over UDP too; the IPv4 loopback CIDR is all of 127.0.0.0/8.
    "udp_exclude_loopback": (("-u", "1337", "-b", "*", "-i", "*", "--redirect-dns", "-o", "53"),
                             {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/8"}),
    "drop_invalid": (("-u", "1337", "-b", "8080", "-i", "*", "--drop-invalid"), {}),
}


@dataclass(frozen=True)
class Breakage:
    """Rules ("TABLE CHAIN SPEC", as iptables-save spells them) to delete, or to replace in place."""

    delete: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Path_:
    name: str
    config: str
    direction: str
    dst: str
    port: int
    expect: tuple[str, int]
    broken: tuple[str, int]
    breakage: Breakage
    uid: int = APP_UID
    gid: int | None = None
    proto: str = "tcp"


def _nat(*rules: str) -> Breakage:
    return Breakage(delete=tuple(f"nat {rule}" for rule in rules))


DNS_UDP_RULE = f"ISTIO_OUTPUT_DNS -d {RESOLVER}/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"
DNS_TCP_RULE = f"ISTIO_OUTPUT_DNS -d {RESOLVER}/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053"
PROXY_LO_RULES = [f"ISTIO_OUTPUT ! -d {{loop}} -o lo -p tcp {{port}} -m owner --{kind}-owner 1337 -j ISTIO_IN_REDIRECT"
                  for kind in ("uid", "gid")]


def _proxy_lo(loop: str, dns: bool) -> list[str]:
    return [rule.format(loop=loop, port="-m multiport ! --dports 53,15008" if dns and "uid" in rule
                        else "-m tcp ! --dport 15008") for rule in PROXY_LO_RULES]


PATHS = (
    Path_("dns_udp_to_resolver_reaches_agent_and_answer_returns", "dns", "out", RESOLVER, 53, ("proxy", 15053),
          ("peer", 53), _nat(DNS_UDP_RULE), proto="udp"),
    Path_("dns_tcp_to_resolver_reaches_agent", "dns", "out", RESOLVER, 53, ("proxy", 15053), ("proxy", 15001),
          _nat(DNS_TCP_RULE)),
    Path_("dns_udp_to_other_server_not_captured", "dns", "out", PEER_V4, 53, ("peer", 53), ("proxy", 15053),
          Breakage(replace=((f"nat {DNS_UDP_RULE}", DNS_UDP_RULE.replace(f"-d {RESOLVER}/32 ", ""),),)),
          proto="udp"),
    Path_("proxy_dns_query_goes_upstream", "dns", "out", RESOLVER, 53, ("peer", 53), ("proxy", 15053),
          _nat("ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN", "ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"),
          uid=PROXY_UID, gid=PROXY_UID, proto="udp"),
    Path_("excluded_owner_group_not_captured", "dns", "out", PEER_SERVICE_V4, 8080, ("peer", 8080),
          ("proxy", 15001), _nat(f"ISTIO_OUTPUT -m owner --gid-owner {EXCLUDED_GROUP} -j RETURN"),
          uid=OTHER_UID, gid=EXCLUDED_GROUP),
    Path_("other_group_captured", "dns", "out", PEER_SERVICE_V4, 8080, ("proxy", 15001), ("peer", 8080),
          _nat("ISTIO_OUTPUT -j ISTIO_REDIRECT"), uid=OTHER_UID, gid=OTHER_UID),
    Path_("proxy_to_127_0_0_5_goes_inbound_with_loopback_32", "dns", "out", "127.0.0.5", 8080, ("proxy", 15006),
          ("app", 8080), _nat(*_proxy_lo("127.0.0.1/32", dns=True)), uid=PROXY_UID, gid=PROXY_UID),
    Path_("capture_all_dns_udp_to_any_server", "capture_all", "out", PEER_V4, 53, ("proxy", 15053), ("peer", 53),
          _nat("ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"), proto="udp"),
    Path_("capture_all_dns_tcp_to_any_server", "capture_all", "out", PEER_V4, 53, ("proxy", 15053),
          ("proxy", 15001), _nat("ISTIO_OUTPUT_DNS -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053")),
    Path_("inbound_on_excluded_interface_not_captured", "exclude_nic", "in", POD_V4, 8080, ("app", 8080),
          ("proxy", 15006), _nat("PREROUTING -i eth0 -j RETURN")),
    Path_("outbound_on_excluded_interface_not_captured", "exclude_nic", "out", PEER_SERVICE_V4, 8080,
          ("peer", 8080), ("proxy", 15001), _nat("OUTPUT -o eth0 -j RETURN")),
    Path_("excluded_udp_port_not_captured", "udp_exclude_loopback", "out", RESOLVER, 53, ("peer", 53),
          ("proxy", 15053), _nat("ISTIO_OUTPUT -p udp -m udp --dport 53 -j RETURN"), proto="udp"),
    Path_("excluded_tcp_port_not_captured", "udp_exclude_loopback", "out", RESOLVER, 53, ("peer", 53),
          ("proxy", 15053), _nat("ISTIO_OUTPUT -p tcp -m tcp --dport 53 -j RETURN")),
    Path_("proxy_to_127_0_0_5_stays_local_with_loopback_8", "udp_exclude_loopback", "out", "127.0.0.5", 8080,
          ("app", 8080), ("proxy", 15006),
          Breakage(replace=tuple((f"nat {old}", new) for old, new in
                                 zip(_proxy_lo("127.0.0.0/8", dns=True), _proxy_lo("127.0.0.1/32", dns=True)))),
          uid=PROXY_UID, gid=PROXY_UID),
)


def config_env(name: str, resolv: Path) -> dict[str, str]:
    return clean_environ({**CONFIGS[name][1], "ISTIO_INIT_RESOLV_CONF": str(resolv)})


LEGACY = ("--rules-version", "current", "--iptables-backend", "legacy")


def up(name: str, resolv: Path, flags: tuple[str, ...] = LEGACY, tag: str = "cur") -> Pod:
    """The pod of config `name`, its rules applied by istio-init with `flags`, listeners started."""
    args = CONFIGS[name][0]
    pod = Pod.up(args, ipv6=False, listeners=False, tag=f"{tag}-{name}", apply=False)
    try:
        argv = [sys.executable, "-m", "istio_init", *flags, *args, "--ipv6", "false",
                "--network-namespace", f"/run/netns/{pod.name}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              env=config_env(name, resolv))
        if done.returncode != 0:
            raise RuntimeError(f"istio-init apply failed: {done.stderr.strip()}")
        pod.start_listeners()
    except BaseException:
        pod.down()
        raise
    return pod


def write_resolv_conf(directory: Path) -> Path:
    """The pods' resolv.conf: one nameserver, a peer address."""
    conf = directory / "resolv.conf"
    conf.write_text(f"search svc.cluster.local\nnameserver {RESOLVER}\noptions ndots:5\n")
    return conf


def every_pod(resolv: Path, flags: tuple[str, ...] = LEGACY, tag: str = "cur") -> Iterator[dict[str, Pod]]:
    """One pod per config (the module fixtures' body), all taken down at the end."""
    made: dict[str, Pod] = {}
    try:
        for name in CONFIGS:
            made[name] = up(name, resolv, flags, tag)
        yield made
    finally:
        for pod in made.values():
            pod.down()


def connect(pod: Pod, path: Path_) -> Answer:
    if path.direction == "in":
        return pod.inbound(path.dst, path.port, proto=path.proto)
    return pod.outbound(path.dst, path.port, uid=path.uid, gid=path.gid, proto=path.proto)


def outcome(answer: Answer) -> tuple[str | None, int | None]:
    assert answer.error is None, answer.error
    return answer.tag, answer.listener
