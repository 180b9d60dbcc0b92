"""Istio's native nftables goldens as istio-init cases (current rule set).

Each entry is one test case of Istio's `tools/istio-nftables/pkg/capture/run_test.go`
(istio/istio; the commit is in tests/golden/nft/SOURCE.md), its config written
as istio-init flags and environment. The base config of that file (ports
15001/15006/15008, uid and gid 1337, mark 1337, table 133, owner groups `*`,
loopback 127.0.0.1/32) is istio-init's defaults, pinned below so that the
host's istio-proxy user cannot change them. The DNS resolvers those tests set
directly (DNSServersV4/V6) reach istio-init the way they reach Istio in a pod:
as `nameserver` lines of /etc/resolv.conf (tests/nftsandbox.py mounts one).
The groups `java` and `ftp` are looked up by name, by Istio's nft and by
istio-init alike, so the sandbox's /etc/group has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden" / "nft"
BASE_ARGS = ("--rules-version", "current", "-p", "15001", "-z", "15006", "-e", "15008", "-u", "1337",
             "-g", "1337", "-t", "1337", "-r", "133")
TEST_GROUPS = {"java": 4242, "ftp": 4243}


@dataclass(frozen=True)
class NftCase:
    name: str
    args: tuple[str, ...] = ()
    ipv6: bool = False
    env: dict[str, str] = field(default_factory=dict)
    resolvers: tuple[str, ...] = ()

    @property
    def argv(self) -> list[str]:
        """The flags of a run of this case (without -n), family pinned."""
        return [*BASE_ARGS, *self.args, "--ipv6", "true" if self.ipv6 else "false", "--native-nftables"]

    @property
    def golden(self) -> Path:
        return GOLDEN_DIR / f"{self.name}.golden"


_DNS = ("--redirect-dns",)
_UIDS = ("-u", "3,4", "-g", "1,2")

NFT_CASES: tuple[NftCase, ...] = (
    NftCase("ipv6-empty-inbound-ports", ("-b", ""), ipv6=True),
    NftCase("ip-range", ("-x", "1.1.0.0/16", "-i", "9.9.0.0/16", *_DNS, *_UIDS), resolvers=("127.0.0.53",)),
    NftCase("tproxy", ("-m", "TPROXY", "-b", "*", "-x", "1.1.0.0/16", "-i", "9.9.0.0/16", *_DNS,
                       "-c", "not-istio-nic"), ipv6=True, resolvers=("127.0.0.53",)),
    NftCase("ipv6-inbound-ports", ("-b", "4000,5000"), ipv6=True),
    NftCase("ipv6-virt-interfaces", ("-b", "4000,5000", "-k", "eth0,eth1"), ipv6=True),
    NftCase("ipv6-ipnets", ("-b", "4000,5000", "-d", "6000,7000,", "-k", "eth0,eth1", "-x", "2001:db8::/32",
                            "-i", "2001:db8::/32"), ipv6=True),
    NftCase("ipv6-uid-gid", ("-b", "4000,5000", "-d", "6000,7000", "-k", "eth0,eth1", *_UIDS,
                             "-x", "2001:db8::/32", "-i", "2001:db8::/32"), ipv6=True),
    NftCase("ipv6-outbound-ports", ("-b", "", "-q", "32000,31000"), ipv6=True),
    NftCase("empty"),
    NftCase("kube-virt-interfaces", ("-k", "eth1,eth2", "-i", "*")),
    NftCase("ipnets", ("-i", "10.0.0.0/8",)),
    NftCase("ipnets-with-kube-virt-interfaces", ("-k", "eth1,eth2", "-i", "10.0.0.0/8")),
    NftCase("inbound-ports-include", ("-b", "32000,31000")),
    NftCase("inbound-ports-wildcard", ("-b", "*")),
    NftCase("inbound-ports-tproxy", ("-b", "32000,31000", "-m", "TPROXY")),
    NftCase("inbound-ports-wildcard-tproxy", ("-b", "*", "-m", "TPROXY")),
    NftCase("inbound-ports-empty-tproxy", ("-b", "", "-m", "TPROXY")),
    NftCase("dns-uid-gid", (*_DNS, *_UIDS), ipv6=True, resolvers=("127.0.0.53", "::127.0.0.53")),
    NftCase("ipv6-dns-uid-gid", (*_DNS, *_UIDS), ipv6=True),
    NftCase("outbound-owner-groups", env={"ISTIO_OUTBOUND_OWNER_GROUPS": "java,202"}),
    NftCase("outbound-owner-groups-exclude", env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,ftp"}),
    NftCase("ipv6-dns-outbound-owner-groups", _DNS, ipv6=True, env={"ISTIO_OUTBOUND_OWNER_GROUPS": "java,202"}),
    NftCase("ipv6-dns-outbound-owner-groups-exclude", _DNS, ipv6=True,
            env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,ftp"}),
    NftCase("outbound-ports-include", ("-q", "32000,31000")),
    NftCase("loopback-outbound-iprange", ("-i", "127.1.2.3/32", *_DNS, *_UIDS), resolvers=("127.0.0.53",)),
    NftCase("basic-exclude-nic", ("-c", "not-istio-nic")),
    NftCase("drop-invalid", ("--drop-invalid",)),
    NftCase("host-ipv4-loopback-cidr", env={"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/8"}),
)
