"""Istio's own capture goldens as the cases of the current rule set.

Source (facts carried over as test data, not code): istio/istio at commit
86c9f01fd735fb01d8192f5bcaf0d424afb7f14c (master, 1.32-dev, August 2026),
- `tools/istio-iptables/pkg/capture/testdata/<name>.golden`: the 27 goldens, copied
  verbatim to `tests/golden/current/istio/<name>.golden`;
- `tools/istio-iptables/pkg/capture/run_test.go`: the config of each golden
  (`getCommonTestCases`, applied over `constructTestConfig`: ports 15001/15006/15008,
  uid and gid 1337, TPROXY mark 1337, route table 133, owner groups `*`,
  IPv4 loopback CIDR 127.0.0.1/32). Each entry below is that config as our
  flags, environment and pod facts (IPv6 on or off, the resolv.conf nameservers
  that run_test.go gives as DNSServersV4/V6).

How the golden text is laid out, and what we compare: Istio's golden is the list
of commands its stub recorded, joined by newlines: `iptables-save` and
`ip6tables-save` (the state reads), then the `iptables-restore` input of IPv4,
then that of IPv6 (the second `* nat` block starts it), then the closing save
commands. The restore input is in Istio's creation order and spelling (`* nat`,
`-N CHAIN`, `-I CHAIN 2`, `-p tcp --dport 53` without `-m tcp`, `--set-mark 1337`).
Our dry run prints canonical iptables-save text, so each golden is converted
once by the kernel: its restore input is loaded into a fresh namespace with
`iptables-legacy-restore --noflush` (and the ip6tables one) and read back with
`iptables-legacy-save`; the result, with chains in iptables-save's order and
tables in the golden's order, is `tests/golden/current/<name>.txt`
(`UPDATE_GOLDEN=1 scripts/test tests/test_current_goldens.py` rewrites it from
the Istio golden alone, never from our planner). test_current_goldens.py
repeats the conversion on every run with the legacy and the nft tools and
checks it still gives the stored text.

Owner groups: run_test.go names groups `java` and `ftp`, which few hosts have.
They are mapped to the numeric gids in GROUP_GIDS, in our environment and in the
converted golden alike, so nothing depends on the host's /etc/group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cases import SEED_ARGS

GOLDEN_DIR = Path(__file__).parent / "golden" / "current"
ISTIO_GOLDEN_DIR = GOLDEN_DIR / "istio"
ISTIO_SOURCE = "istio/istio tools/istio-iptables/pkg/capture/testdata"

RULES = ("--rules-version", "current")
# The arguments current Istio's injection gives the init container (the 1.8 seed's, and its log flag).
INJECTED = [*SEED_ARGS, "--log_output_level=default:info"]
GROUP_GIDS = {"java": 20001, "ftp": 20002}


@dataclass(frozen=True)
class CurrentCase:
    name: str
    args: tuple[str, ...]
    ipv6: bool = False
    env: dict[str, str] = field(default_factory=dict)
    resolvers: tuple[str, ...] = ()

    @property
    def golden(self) -> Path:
        return GOLDEN_DIR / f"{self.name}.txt"

    @property
    def istio_golden(self) -> Path:
        return ISTIO_GOLDEN_DIR / f"{self.name}.golden"

    def resolv_conf(self) -> str:
        return "".join(f"nameserver {server}\n" for server in self.resolvers)

    def argv(self, dry_run: bool = True) -> list[str]:
        """Command line; the family is pinned so no kernel is consulted for it."""
        return [*RULES, *self.args, *(["-n"] if dry_run else []), "--ipv6", "true" if self.ipv6 else "false"]


def _case(name: str, *args: str, uid: str = "1337", gid: str = "1337", ipv6: bool = False,
          env: dict[str, str] | None = None, resolvers: tuple[str, ...] = ()) -> CurrentCase:
    return CurrentCase(name, ("-u", uid, "-g", gid, *args), ipv6, env or {}, resolvers)


_JAVA, _FTP = str(GROUP_GIDS["java"]), str(GROUP_GIDS["ftp"])

CURRENT_CASES: tuple[CurrentCase, ...] = (
    _case("ipv6-empty-inbound-ports", "-b", "", ipv6=True),
    _case("ip-range", "-x", "1.1.0.0/16", "-i", "9.9.0.0/16", "--redirect-dns", uid="3,4", gid="1,2",
          resolvers=("127.0.0.53",)),
    _case("tproxy", "-m", "TPROXY", "-b", "*", "-x", "1.1.0.0/16", "-i", "9.9.0.0/16", "--redirect-dns",
          "-c", "not-istio-nic", ipv6=True, resolvers=("127.0.0.53",)),
    _case("ipv6-inbound-ports", "-b", "4000,5000", ipv6=True),
    _case("ipv6-virt-interfaces", "-b", "4000,5000", "-k", "eth0,eth1", ipv6=True),
    _case("ipv6-ipnets", "-b", "4000,5000", "-d", "6000,7000,", "-k", "eth0,eth1", "-x", "2001:db8::/32",
          "-i", "2001:db8::/32", ipv6=True),
    _case("ipv6-uid-gid", "-b", "4000,5000", "-d", "6000,7000", "-k", "eth0,eth1", "-x", "2001:db8::/32",
          "-i", "2001:db8::/32", uid="3,4", gid="1,2", ipv6=True),
    _case("ipv6-outbound-ports", "-b", "", "-q", "32000,31000", ipv6=True),
    _case("empty"),
    _case("kube-virt-interfaces", "-k", "eth1,eth2", "-i", "*"),
    _case("ipnets", "-i", "10.0.0.0/8"),
    _case("ipnets-with-kube-virt-interfaces", "-k", "eth1,eth2", "-i", "10.0.0.0/8"),
    _case("inbound-ports-include", "-b", "32000,31000"),
    _case("inbound-ports-wildcard", "-b", "*"),
    _case("inbound-ports-tproxy", "-b", "32000,31000", "-m", "TPROXY"),
    _case("inbound-ports-wildcard-tproxy", "-b", "*", "-m", "TPROXY"),
    _case("dns-uid-gid", "--redirect-dns", uid="3,4", gid="1,2", ipv6=True,
          resolvers=("127.0.0.53", "::127.0.0.53")),
    _case("ipv6-dns-uid-gid", "--redirect-dns", uid="3,4", gid="1,2", ipv6=True),
    _case("outbound-owner-groups", env={"ISTIO_OUTBOUND_OWNER_GROUPS": f"{_JAVA},202"}),
    _case("outbound-owner-groups-exclude", env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": f"888,{_FTP}"}),
    _case("ipv6-dns-outbound-owner-groups", "--redirect-dns", ipv6=True,
          env={"ISTIO_OUTBOUND_OWNER_GROUPS": f"{_JAVA},202"}),
    _case("ipv6-dns-outbound-owner-groups-exclude", "--redirect-dns", ipv6=True,
          env={"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": f"888,{_FTP}"}),
    _case("outbound-ports-include", "-q", "32000,31000"),
    _case("loopback-outbound-iprange", "-i", "127.1.2.3/32", "--redirect-dns", uid="3,4", gid="1,2",
          resolvers=("127.0.0.53",)),
    _case("basic-exclude-nic", "-c", "not-istio-nic"),
    _case("drop-invalid", "--drop-invalid"),
    _case("host-ipv4-loopback-cidr", env={"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/8"}),
)
