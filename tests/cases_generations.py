"""Istio's own expected rules for the releases between 1.8 and current, as cases.

Source (facts carried over as test data, not code): istio/istio at the tags
below (https://github.com/istio/istio), each file copied verbatim to
`tests/golden/istio/<tag>/`:
- 1.12.9, 1.17.8, 1.19.10, 1.21.6, 1.23.6, 1.24.6:
  `tools/istio-iptables/pkg/capture/testdata/<name>.golden`, the capture goldens
  (a command list, `iptables -t nat -A ...` one per line, up to 1.23; restore
  input from 1.24); the config of each is in that tag's
  `tools/istio-iptables/pkg/capture/run_test.go`, the same configs as the
  current rule set's cases (cases_current.py) plus `logging` (TraceLogging).
- 1.25.5: `tools/istio-iptables/pkg/capture/testdata/logging.golden` only (the
  release's other goldens are the current rule set's cases): the last release
  whose istio-iptables takes --iptables-trace-logging, writing no NFLOG rule.
- 1.9.9, 1.10.6 and 1.11.8: `tools/istio-iptables/pkg/cmd/run_test.go`, the
  `expected` string list of each test that runs the whole rule set
  (`iptConfigurator.run()`), one string per line in `<TestName>.golden`; the
  configs are those tests' (1.10.6's with ISTIO_META_DNS_CONNTRACK_ZONE on, as
  its tests set it). Every one of them is IPv4 only.

As for the current goldens, each is converted once by the kernel (loaded with
`iptables-legacy-restore --noflush`, read back with `iptables-legacy-save`) into
canonical text, `tests/golden/generations/<tag>/<name>.txt`, which the dry run
must equal (`UPDATE_GOLDEN=1` with test_generation_goldens.py rewrites it from
Istio's file alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cases_current import CURRENT_CASES, GROUP_GIDS, CurrentCase

ISTIO_DIR = Path(__file__).parent / "golden" / "istio"
CONVERTED_DIR = Path(__file__).parent / "golden" / "generations"
CAPTURE_TAGS = ("1.12.9", "1.17.8", "1.19.10", "1.21.6", "1.23.6", "1.24.6", "1.25.5")
RUN_TEST_TAGS = ("1.9.9", "1.10.6", "1.11.8")
# 1.10.3 to 1.10.6 ran these tests with ISTIO_META_DNS_CONNTRACK_ZONE on (`useConntrackZoneDNS = true`).
_RUN_TEST_ENV = {"1.10.6": {"ISTIO_META_DNS_CONNTRACK_ZONE": "true"}}

__all__ = ["GENERATION_CASES", "GROUP_GIDS", "GenerationCase"]


@dataclass(frozen=True)
class GenerationCase(CurrentCase):
    """A case of one release (`tag`): its golden files and the tag as --rules-version."""

    tag: str = ""

    @property
    def id(self) -> str:
        return f"{self.tag}-{self.name}"

    @property
    def istio_golden(self) -> Path:
        return ISTIO_DIR / self.tag / f"{self.name}.golden"

    @property
    def golden(self) -> Path:
        return CONVERTED_DIR / self.tag / f"{self.name}.txt"

    def argv(self, dry_run: bool = True) -> list[str]:
        """Command line: the release's tag selects its rule set; the family is pinned."""
        return ["--rules-version", self.tag, *super().argv(dry_run)[2:]]


def _capture_cases(tag: str) -> list[GenerationCase]:
    names = {path.stem for path in (ISTIO_DIR / tag).glob("*.golden")}
    cases = [GenerationCase(c.name, c.args, c.ipv6, c.env, c.resolvers, tag=tag)
             for c in CURRENT_CASES if c.name in names]
    if "logging" in names:
        cases.append(GenerationCase("logging", ("-u", "1337", "-g", "1337", "--iptables-trace-logging"), tag=tag))
    return cases


_DNS = ("--redirect-dns",)
_IDS = ("-u", "3,4", "-g", "1,2")
_RESOLVER = ("127.0.0.53",)


def _run_test_cases(tag: str) -> list[GenerationCase]:
    env = _RUN_TEST_ENV.get(tag, {})
    cases = [
        GenerationCase("TestRulesWithIpRange", (*_IDS, "-x", "1.1.0.0/16", "-i", "9.9.0.0/16", *_DNS),
                       env=env, resolvers=_RESOLVER, tag=tag),
        GenerationCase("TestRulesWithTproxy", ("-u", "1337", "-g", "1337", "-m", "TPROXY", "-b", "*",
                                               "-x", "1.1.0.0/16", "-i", "9.9.0.0/16", *_DNS),
                       env=env, resolvers=_RESOLVER, tag=tag),
        GenerationCase("TestHandleInboundIpv4RulesWithUidGid", (*_IDS, *_DNS), env=env, resolvers=_RESOLVER, tag=tag),
        GenerationCase("TestRulesWithLoopbackIpInOutboundIpRanges", (*_IDS, "-i", "127.1.2.3/32", *_DNS),
                       env=env, resolvers=_RESOLVER, tag=tag),
    ]
    if (ISTIO_DIR / tag / "TestExcludeIterface.golden").exists():
        cases.append(GenerationCase("TestExcludeIterface", ("-u", "1337", "-g", "1337",
                                                            "--istio-exclude-interfaces", "not-istio-nic"), tag=tag))
    return cases


GENERATION_CASES: tuple[GenerationCase, ...] = tuple(
    [case for tag in RUN_TEST_TAGS for case in _run_test_cases(tag)]
    + [case for tag in CAPTURE_TAGS for case in _capture_cases(tag)])
