"""The planner and renderer against the golden table (pure: no root, no kernel)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cases import CASES, GOLDEN_DIR, SEED_ARGS, Case
from clirun import invoke

RULES_MD = Path(__file__).resolve().parents[1] / "docs" / "rules-1.8.md"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dry_run_matches_golden(case: Case) -> None:
    result = invoke(case.argv, case.env)
    assert result.code == 0, result.stderr
    if os.environ.get("UPDATE_GOLDEN") == "1":
        case.golden.write_text(result.stdout)
    assert result.stdout == case.golden.read_text()


def _rules_md_seed_block() -> str:
    text = RULES_MD.read_text()
    start = text.index("```\n*nat") + len("```\n")
    return text[start:text.index("```", start)]


def test_seed_matches_rules_md_worked_example() -> None:
    """docs/rules-1.8.md's worked example is what a dry run prints."""
    result = invoke([*SEED_ARGS, "-n", "--ipv6", "false"])
    assert result.stdout == _rules_md_seed_block()


def test_seed_matches_console_2_reference_counts() -> None:
    """The seed article's Console 2: ISTIO_IN_REDIRECT has 3 references, the others 1."""
    stdout = invoke([*SEED_ARGS, "-n", "--ipv6", "false"]).stdout
    jumps = [line.split(" -j ")[1].split()[0] for line in stdout.splitlines() if line.startswith("-A")]
    counts = {chain: jumps.count(chain) for chain in
              ("ISTIO_INBOUND", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_REDIRECT")}
    assert counts == {"ISTIO_INBOUND": 1, "ISTIO_IN_REDIRECT": 3, "ISTIO_OUTPUT": 1, "ISTIO_REDIRECT": 1}


def test_dry_run_stdout_is_only_rules_and_summary_goes_to_stderr() -> None:
    result = invoke([*SEED_ARGS, "-n", "--ipv6", "true"])
    lines = result.stdout.splitlines()
    assert lines.count("# IPv6") == 1
    assert all(line.startswith(("*", ":", "-A", "COMMIT", "# IPv6")) for line in lines)
    assert "effective configuration" in result.stderr


def test_ipv6_part_follows_marker_and_uses_ipv6_addresses() -> None:
    stdout = invoke([*SEED_ARGS, "-n", "--ipv6", "true"]).stdout
    v4, v6 = stdout.split("# IPv6\n")
    assert "127.0.0.6/32" in v4 and "::6/128" not in v4
    assert "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN" in v6
    assert "! -d ::1/128 -o lo -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT" in v6


def test_planner_is_pure_and_reports_ipv6_extras() -> None:
    from istio_init.config import from_sources
    from istio_init.rulesets import plan

    config = from_sources({"inbound_ports": "80", "inbound_interception_mode": "TPROXY"}, environ={})
    rule_plan = plan(config, ipv6=True)
    assert rule_plan.loopback_addresses == ("::6/128",)
    assert [(r.fwmark, r.table) for r in rule_plan.routes] == [(1337, 133)]
    assert rule_plan.ipv6 is not None
    assert "mangle" not in rule_plan.ipv6.tables()
    assert plan(config, ipv6=True) == rule_plan


def test_readme_shows_the_seed_output() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert (GOLDEN_DIR / "seed.txt").read_text() in readme


def test_istio_iptables_first_word_is_optional() -> None:
    with_word = invoke([*SEED_ARGS, "-n", "--ipv6", "false"])
    without = invoke([*SEED_ARGS[1:], "-n", "--ipv6", "false"])
    assert with_word.stdout == without.stdout and with_word.code == 0


def test_python_dash_m_runs_the_cli() -> None:
    import subprocess
    import sys

    from clirun import clean_environ

    out = subprocess.run([sys.executable, "-m", "istio_init", *SEED_ARGS, "-n", "--ipv6", "false"],
                         capture_output=True, text=True, env=clean_environ(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == invoke([*SEED_ARGS, "-n", "--ipv6", "false"]).stdout


def test_help_names_every_flag_with_default() -> None:
    from istio_init.config import FLAGS

    text = " ".join(invoke(["--help"]).stdout.split())
    for spec in FLAGS:
        assert f"--{spec.long}" in text
        if spec.short:
            assert f"-{spec.short}," in text
    assert "default: 15001" in text


@pytest.mark.root
@pytest.mark.parametrize("addresses,ipv6", [
    ((), False),                                  # no address at all: IPv4, not a crash
    (("192.0.2.10/24",), False),
    (("2001:db8::10/64",), True),
    (("192.0.2.10/24", "2001:db8::10/64"), False),  # the first address is the IPv4 one
])
def test_ip_family_is_detected_from_the_pods_first_address(netns, addresses, ipv6: bool) -> None:
    import sys

    from clirun import clean_environ

    for address in addresses:
        netns.add_address(address)
    out = netns.run(sys.executable, "-m", "istio_init", *SEED_ARGS, "-n", env=clean_environ())
    assert ("# IPv6" in out.stdout.splitlines()) == ipv6
    assert f"ip families: {'IPv4, IPv6' if ipv6 else 'IPv4'}" in out.stderr
