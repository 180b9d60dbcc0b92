"""config.parse_cidr's fast IPv4 path agrees with the standard library everywhere."""

from __future__ import annotations

import ipaddress
import random

import pytest

from istio_init.config import parse_cidr

EDGES = ["10.1.2.3/8", "0.0.0.0/0", "255.255.255.255", "127.0.0.1/32", "127.0.0.0/7", "127.1.0.0/16",
         "192.0.2.77/24", "1.2.3.4/33", "256.1.1.1/8", "01.2.3.4/8", "10.0.0.0/08", "10.0.0.0/255.0.0.0",
         "2001:db8::1/32", "::1", "::1/128", "fd00::/8", "1.2.3", "10.0.0.0/", "a.b.c.d", "1.2.3.4/-1"]


def _stdlib(text: str) -> tuple | str:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return "invalid"
    return (str(net), net.version, net.is_loopback)


def _ours(text: str) -> tuple | str:
    try:
        return tuple(parse_cidr(text))
    except ValueError:
        return "invalid"


@pytest.mark.parametrize("text", EDGES)
def test_edges_agree_with_ipaddress(text: str) -> None:
    assert _ours(text) == _stdlib(text)


def test_random_ipv4_forms_agree_with_ipaddress() -> None:
    rng = random.Random(1337)
    for _ in range(5000):
        text = ".".join(str(rng.randint(0, 300)) for _ in range(4))
        text += rng.choice(["", f"/{rng.randint(0, 34)}"])
        assert _ours(text) == _stdlib(text), text


def test_cidr_renders_as_its_network_form() -> None:
    assert str(parse_cidr("10.1.2.3/8")) == "10.0.0.0/8"
    assert str(parse_cidr("2001:db8::1/32")) == "2001:db8::/32"


def test_a_long_host_list_parses_as_each_item_does() -> None:
    """parse_cidrs' one-match path for long lists of IPv4 hosts gives what parse_cidr gives per item."""
    from istio_init.config import parse_cidrs

    rng = random.Random(7)
    hosts = [".".join(str(rng.randint(0, 255)) for _ in range(4)) + rng.choice(["", "/32"]) for _ in range(500)]
    hosts += ["127.0.0.1", "127.9.9.9/32", "0.0.0.0"]
    assert parse_cidrs(hosts) == [parse_cidr(h) for h in hosts]
    mixed = hosts + ["10.1.2.3/8", "2001:db8::1"]  # not all hosts: item by item
    assert parse_cidrs(mixed) == [parse_cidr(h) for h in mixed]
    with pytest.raises(ValueError):
        parse_cidrs(hosts + ["10.0.0.256"])
    # All spelled a.b.c.d/32 (the quickest path), with and without a loopback host among them.
    slashed = [f"10.{i}.127.{i}/32" for i in range(40)]
    for case in (slashed, slashed + ["127.0.0.5/32"], ["127.1.1.1/32"] + slashed):
        assert parse_cidrs(case) == [parse_cidr(h) for h in case]
        assert [type(c) for c in parse_cidrs(case)] == [type(parse_cidr(h)) for h in case]


@pytest.mark.parametrize("odd", ["01.2.3.4", "1.2.3.04", "1.2.3", "1.2.3.4.5", "1..2.3", "1.2.3.4.", ".1.2.3",
                                 "256.1.1.1", "1.2.3.4/32/32", "１.2.3.4", "+1.2.3.4", "0x1.2.3.4", "1.2.3.4\x00",
                                 "1.2.3.-4", "1.2.3.4/", "0.0.0.0", "255.255.255.255/32"])
def test_a_long_host_list_with_one_near_miss_agrees_with_each_item(odd: str) -> None:
    """The whole-list check (inet_pton over every item) accepts and refuses as parse_cidr does item by item."""
    from istio_init.config import parse_cidrs

    hosts = [f"198.51.100.{i}" for i in range(40)] + [odd]
    try:
        expected = [parse_cidr(h) for h in hosts]
    except ValueError:
        with pytest.raises(ValueError):
            parse_cidrs(hosts)
        return
    assert parse_cidrs(hosts) == expected
