"""Flags and variables of the releases 1.9 to 1.24 under their rule sets (pure: dry runs and refusals)."""

from __future__ import annotations

import pytest

from clirun import invoke

DRY = ["-n", "--ipv6", "false"]


@pytest.mark.parametrize("rules,argv,message", [
    ("1.10", ["--drop-invalid"], "invalid value for --drop-invalid: 'true': exists only with --rules-version 1.12 to "
                                 "current (Istio 1.12-1.32; this run uses 1.9, for Istio 1.9-1.10)"),
    ("1.24", ["--iptables-version", "1.8.7"], "invalid value for --iptables-version: '1.8.7': exists only with "
                                              "--rules-version 1.18 to 1.20 (Istio 1.18-1.21; this run uses 1.24)"),
    ("1.24.6", ["-f"], "invalid value for -f/--restore-format: 'true': exists only with --rules-version 1.8 to 1.23 "
                       "(Istio 1.8-1.23; this run uses 1.24)"),
    ("1.11", ["--iptables-trace-logging"], "invalid value for --iptables-trace-logging: 'true': exists only with "
                                           "--rules-version 1.12 to current (Istio 1.12-1.25; this run uses 1.11)"),
    ("1.18", ["--host-nsenter-exec"], "invalid value for --host-nsenter-exec: 'true': exists only with "
                                      "--rules-version 1.13 (Istio 1.15-1.17; this run uses 1.18, for Istio 1.18-1.19)"),
    ("1.11", ["--reconcile"], "invalid value for --reconcile: 'true': exists only with --rules-version 1.24 to current "
                              "(Istio 1.24-1.32; this run uses 1.11)"),
])
def test_a_flag_of_other_releases_is_one_line_naming_the_releases(rules: str, argv: list[str], message: str) -> None:
    result = invoke(["--rules-version", rules, *argv, *DRY])
    assert result.code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"istio-init: {message}"]


@pytest.mark.parametrize("rules,argv", [
    ("1.9", ["-f", "--restore-format=false"]), ("1.11", ["--output-paths", "/dev/stdout", "--cni-mode"]),
    ("1.15.2", ["--host-nsenter-exec", "-c", "eth9", "--iptables-trace-logging"]),
    ("1.21", ["--iptables-version", "1.8.7", "--dual-stack", "--drop-invalid"]),
    ("1.24", ["--reconcile", "--force-apply", "--capture-all-dns", "--redirect-dns"]),
])
def test_each_releases_own_flags_are_accepted(rules: str, argv: list[str]) -> None:
    result = invoke(["--rules-version", rules, "-i", "*", *argv, *DRY])
    assert result.code == 0, result.stderr
    assert "warning" not in result.stderr


@pytest.mark.parametrize("rules,by_variable", [("1.10", True), ("1.9", True), ("1.11", False)])
def test_dns_conntrack_zone_variable_of_1_10(rules: str, by_variable: bool) -> None:
    """ISTIO_META_DNS_CONNTRACK_ZONE (1.10) puts DNS in conntrack zones; 1.11 on always does (and warns of it)."""
    argv = ["--rules-version", rules, "-i", "*", "--redirect-dns", *DRY]
    plain = invoke(argv)
    assert ("-j CT --zone 2" in plain.stdout) == (not by_variable)
    zoned = invoke(argv, {"ISTIO_META_DNS_CONNTRACK_ZONE": "true"})
    assert zoned.code == 0, zoned.stderr
    assert "-A OUTPUT -p udp -m udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2" in zoned.stdout
    warned = [line for line in zoned.stderr.splitlines() if "ISTIO_META_DNS_CONNTRACK_ZONE" in line]
    assert len(warned) == (0 if by_variable else 1)


@pytest.mark.parametrize("rules", ["1.12", "1.17", "1.20", "1.24"])
def test_trace_logging_puts_nflog_in_front_of_the_logged_rules(rules: str) -> None:
    out = invoke(["--rules-version", rules, "-i", "*", "-b", "8080", "-k", "eth1", "--iptables-trace-logging", *DRY]).stdout
    lines = out.splitlines()
    for prefix, rule in (("InboundCapture", "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"),
                         ("JumpOutbound", "-A OUTPUT -p tcp -j ISTIO_OUTPUT"),
                         ("IncludeInboundPort", "-A ISTIO_INBOUND -p tcp -m tcp --dport 8080 -j ISTIO_IN_REDIRECT"),
                         ("KubevirtCommand", "-A PREROUTING -i eth1 -j ISTIO_REDIRECT")):
        index = lines.index(rule)
        assert f"-j NFLOG --nflog-prefix {prefix} --nflog-group 1337 --nflog-size 20" in lines[index - 1]


def test_the_1_8_and_current_runs_do_not_load_the_other_releases_rule_sets() -> None:
    import subprocess
    import sys

    code = ("import sys, io, contextlib\nfrom istio_init import entry\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    try: entry.main(sys.argv[1:])\n    except SystemExit: pass\n"
            "print('istio_init.rulesets.istio_1_9_to_1_24' in sys.modules)")
    for rules, loaded in (("1.8", "False"), ("current", "False"), ("1.20", "True")):
        done = subprocess.run([sys.executable, "-c", code, "--rules-version", rules, "-i", "*", *DRY],
                              capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == loaded, (rules, done.stderr)
