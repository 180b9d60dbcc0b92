"""The kernel questions that decide between backends are asked once per step (backends.KernelFacts).

Which legacy tables the kernel lists, which iptables-nft tables and which of
istio-init's native tables exist: `check` reading the installed rules (and
choosing the store as an apply would) used to ask eight questions where four
answer, one of them three times. These tests count the questions the System
is asked, on the in-memory host, so they need no root.
"""

from __future__ import annotations

from typing import Any

import pytest

from fakehost import FakeHost
from istio_init import backends, installed, system

NFT_NAT = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n"


class CountingHost(FakeHost):
    """A FakeHost that records each question asked before choosing a backend."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.asked: list[tuple[Any, ...]] = []

    def legacy_tables(self, family: int) -> set[str] | None:
        self.asked.append(("legacy", family))
        return super().legacy_tables(family)

    def iptables_nft_tables(self, family: int) -> set[str]:
        self.asked.append(("nft", family))
        return super().iptables_nft_tables(family)

    def native_nft_tables(self) -> set[str]:
        self.asked.append(("native",))
        return super().native_nft_tables()


HOSTS = {
    "legacy kernel, nothing installed": dict(),
    "no legacy ip_tables": dict(legacy=False),
    "iptables-nft tables present": dict(iptables={("nft", 4): NFT_NAT}),
}


@pytest.mark.parametrize("kind", list(HOSTS))
@pytest.mark.parametrize("requested", ["auto", "legacy", "nft"])
def test_reading_the_installed_rules_asks_each_question_once(kind: str, requested: str) -> None:
    host = CountingHost(**HOSTS[kind])
    with system.using(host):
        installed.read(requested)
    assert len(host.asked) == len(set(host.asked)), host.asked
    if requested == "auto":
        assert ("legacy", 4) in host.asked  # the reading did ask the kernel


def test_one_facts_answers_from_its_first_answers_and_a_new_one_asks_again() -> None:
    host = CountingHost()
    with system.using(host):
        facts = backends.KernelFacts()
        assert backends.choose("auto", [4, 6], facts).name == "legacy"
        assert backends.candidates("auto", [4, 6], facts) == ["legacy"]
        assert not backends.native_nft_in_use(facts)
        assert sorted(host.asked) == [("legacy", 4), ("legacy", 6), ("native",), ("nft", 4), ("nft", 6)]
        host.text[("nft", 4)] = NFT_NAT  # the namespace changes: the facts taken before do not see it
        assert backends.choose("auto", [4], facts).name == "legacy"
        assert backends.choose("auto", [4], backends.KernelFacts()).name == "nft"
        assert host.asked.count(("nft", 4)) == 2
