"""The table of flag combinations every rule test is driven from.

Each case is flags (and environment) in, a golden `iptables-save` text out
(`tests/golden/1.8/<name>.txt`; each rule set has its own folder). The pure planner test, the dry-run round trip
through `iptables-restore` and the backend round trips all read this one
list, so they cannot drift apart. Goldens change only with
`UPDATE_GOLDEN=1 pytest tests/test_plan.py`, and such a change is reviewed like code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden" / "1.8"

SEED_ARGS = ("istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
             "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020")


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    ipv6: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        """Command line for a dry run; the family is pinned so no kernel is consulted."""
        return [*self.args, "-n", "--ipv6", "true" if self.ipv6 else "false"]

    @property
    def golden(self) -> Path:
        return GOLDEN_DIR / f"{self.name}.txt"


CASES: tuple[Case, ...] = (
    Case("seed", SEED_ARGS),
    Case("defaults", ()),
    Case("inbound_ports", ("-b", "80,8080,", "-i", "*")),
    Case("inbound_wildcard_excludes", ("-b", "*", "-d", "15090,15021,15020,9000")),
    Case("outbound_cidrs_v4", ("-i", "10.0.0.0/8,172.16.0.0/12", "-x", "10.96.0.0/12")),
    Case("outbound_cidrs_mixed_ipv6", ("-i", "10.0.0.0/8,fd00::/8", "-x", "10.96.0.0/12,fd00:1::/64",
                                       "-b", "8080"), ipv6=True),
    Case("outbound_wildcard_exclude_both", ("-i", "*", "-x", "192.0.2.0/24,2001:db8::/32", "-b", "*"), ipv6=True),
    Case("loopback_include", ("-i", "127.0.0.1/32,10.0.0.0/8", "-b", "*")),
    Case("outbound_ports", ("-i", "10.0.0.0/8", "-q", "3306,5432", "-o", "25,587")),
    Case("uid_gid_lists", ("-i", "*", "-u", "1337,1338", "-g", "1339,1340")),
    Case("kube_virt_wildcard", ("-k", "eth1,eth2", "-i", "*", "-b", "*")),
    Case("kube_virt_cidrs", ("-k", "eth1", "-i", "10.0.0.0/8,198.51.100.0/24")),
    Case("tproxy_wildcard", ("-m", "TPROXY", "-b", "*", "-d", "15020", "-i", "*")),
    Case("tproxy_ports", ("-m", "TPROXY", "-b", "80,443", "-i", "*", "-t", "1338", "-r", "134")),
    Case("dns_capture", ("--redirect-dns", "-i", "*", "-b", "*")),
    Case("dns_capture_env", ("-i", "*", "-u", "1337,1338"), env={"ISTIO_META_DNS_CAPTURE": "true"}),
    Case("ipv6_seed", SEED_ARGS, ipv6=True),
    Case("ipv6_kube_virt_wildcard", ("-k", "eth1", "-i", "*", "-b", "8080", "-o", "25"), ipv6=True),
    Case("environment_only", (), env={"ENVOY_PORT": "16001", "ISTIO_INBOUND_PORTS": "*",
                                      "ISTIO_SERVICE_CIDR": "*", "ISTIO_LOCAL_EXCLUDE_PORTS": "15020",
                                      "PROXY_UID": "1500"}),
    Case("flag_beats_environment", ("-p", "15001",), env={"ENVOY_PORT": "16001", "ISTIO_SERVICE_CIDR": "*"}),
    Case("cidr_network_form", ("-i", "10.1.2.3/8,2001:db8::1/32", "-x", "192.0.2.77/24"), ipv6=True),
    Case("multiport", ("--multiport", "-b", "*", "-d", ",".join(str(p) for p in range(9000, 9020)),
                       "-i", "*", "-o", "25,587")),
)

# Rules a pod may already hold that are not istio-init's: every run, re-run and clean must leave
# them byte for byte (the FORWARD policy included). Shared by the reconcile and apply tests.
UNRELATED_V4 = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 9999 -j ACCEPT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:MY_CHAIN - [0:0]
-A PREROUTING -p udp -j MY_CHAIN
-A OUTPUT -d 192.0.2.1/32 -j RETURN
-A MY_CHAIN -p udp -m udp --dport 5353 -j RETURN
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A OUTPUT -p udp -j MARK --set-xmark 0x7/0xffffffff
COMMIT
"""
UNRELATED_V6 = UNRELATED_V4.replace("192.0.2.1/32", "2001:db8::1/128")
