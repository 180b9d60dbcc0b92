"""config.py's validators without regular expressions agree with the patterns they replace.

config.py checks numbers, marks, durations, CIDRs and lists with string
methods (importing `re` costs every pod start several milliseconds); the
patterns below are the grammar those checks must keep, tried on random text.
"""

from __future__ import annotations

import random
import re

from istio_init import config

_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_HOST = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}(?:/32)?"
SIMPLE_CIDR = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/(3[0-2]|[12]?\d))?", re.ASCII)
HOST_LIST = re.compile(rf"{_HOST}(?:,{_HOST})*+", re.ASCII)
DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")


def _text(rng: random.Random, alphabet: str, most: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(most)))


def test_durations_numbers_and_marks() -> None:
    rng = random.Random(25)
    for _ in range(30000):
        text = _text(rng, "0123456789.nsumhµμx ", 8)
        parts = DURATION_PART.findall(text)
        matched = bool(text) and "".join(n + u for n, u in parts) == text
        assert (bool(text) and config._duration_parts(text) is not None) == matched, text
        if matched:
            assert config._duration_parts(text) == parts, text
        assert config._is_plain_number(text) == bool(re.fullmatch(r"[0-9]+(\.[0-9]+)?", text)), text
        text = _text(rng, "0xX19aFg²", 12)
        assert config._is_hex(text) == bool(re.fullmatch(r"0[xX][0-9a-fA-F]{1,8}", text)), text
        assert config._is_hex(text, None) == bool(re.fullmatch(r"0[xX][0-9a-fA-F]+", text)), text
        assert config._is_decimal(text) == bool(re.fullmatch(r"[0-9]{1,10}", text)), text


def test_ipv4_cidrs_and_host_lists() -> None:
    rng = random.Random(8)
    for _ in range(30000):
        text = _text(rng, "0123459./3", 16)
        match, ours = SIMPLE_CIDR.fullmatch(text), config._simple_ipv4_cidr(text)
        assert (match is not None) == (ours is not None), text
        if match and ours:
            assert (list(match.groups()[:4]), match.group(5)) == ours, text

    def item() -> str:
        if rng.random() < 0.85:
            return ".".join(str(rng.randrange(256)) for _ in range(4)) + rng.choice(["", "/32", "/3", "/321"])
        return _text(rng, "0123459./2", 15) or "1"

    for _ in range(5000):
        items = [item() for _ in range(rng.randrange(17, 30))]
        if rng.random() < 0.5:  # mostly valid lists, so that both answers are tried often
            items = [i.partition("/")[0] for i in items if "." in i] or ["1.2.3.4"]
        joined = ",".join(items)
        assert config._ipv4_host_list(items, joined) == bool(HOST_LIST.fullmatch(joined)), items


def test_rules_versions() -> None:
    for value, expected in [("1.8", "1.8"), ("1.8.3", "1.8"), ("1.25", "current"), ("1.32.0", "current"),
                            ("current", "current"), (" 1.30 ", "current"), ("1.24", "1.24"), ("1.10", "1.9"),
                            ("1.22.8", "1.20"), ("1.17.0", "1.13")]:
        assert config._rules_version({"rules_version": value}, {}) == expected
    for value in ["1.33", "1.7", "1.8.", "01.8", "1.08", "1.010", "1", "1.8.3.4", "1.25.x", "1.8.١", "1.100"]:
        try:
            config._rules_version({"rules_version": value}, {})
        except config.ConfigError:
            continue
        raise AssertionError(f"accepted {value!r}")
