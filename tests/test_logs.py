"""pilot-agent's logging flags (logs.py), with both rule sets, in both forms."""

from __future__ import annotations

import json
import sys

import pytest

from cases import SEED_ARGS
from clirun import clean_environ, invoke

RULE_SETS = ([], ["--rules-version", "current"])
INJECTED_LATER = ("--log_output_level", "--log_as_json")  # written by Istio 1.15 on (config.INJECTED_BY)
WARNING_1_8 = ("istio-init: warning: --log_output_level is in the init container args of Istio 1.15-1.32 (their "
               "rules: --rules-version 1.13 to current); this run installs Istio 1.8's rules (--rules-version 1.8)")
DRY = ["-n", "--ipv6", "false"]


@pytest.mark.parametrize("rules", RULE_SETS, ids=("1.8", "current"))
@pytest.mark.parametrize("flags", [
    ["--log_output_level=default:info"], ["--log_output_level", "default:info"],
    ["--log_target=stderr"], ["--log_target", "stdout,stderr"],
    ["--log_stacktrace_level=default:none"], ["--log_stacktrace_level", "default:error"],
    ["--log_caller=default"], ["--log_caller", "default,iptables"],
    ["--log_as_json=false"],
])
def test_logging_flags_are_accepted_and_change_no_rule(rules: list[str], flags: list[str]) -> None:
    plain = invoke([*SEED_ARGS, *rules, *DRY])
    result = invoke([*SEED_ARGS, *flags, *rules, *DRY])
    assert result.code == 0, result.stderr
    assert result.stdout == plain.stdout
    lines = result.stderr.splitlines()
    if not rules and flags[0].split("=")[0] in INJECTED_LATER:  # 1.8's releases never wrote it: one warning
        assert lines[0].startswith(f"istio-init: warning: {flags[0].split('=')[0]} is in the init container args")
        lines = lines[1:]
    assert lines == plain.stderr.splitlines()


@pytest.mark.parametrize("rules", RULE_SETS, ids=("1.8", "current"))
@pytest.mark.parametrize("level", ["default:warn", "warn", "default:error", "misc:debug,default:warn"])
def test_warn_level_hides_info_lines_but_not_warnings_or_errors(rules: list[str], level: str) -> None:
    plain = invoke([*SEED_ARGS, *rules, *DRY])
    assert "effective configuration" in plain.stderr
    quiet = invoke([*SEED_ARGS, *rules, f"--log_output_level={level}", *DRY])
    assert quiet.code == 0 and quiet.stdout == plain.stdout
    shown_1_8 = [WARNING_1_8] if not rules and not level.endswith("error") else []
    assert quiet.stderr.splitlines() == shown_1_8
    other = "ISTIO_DUAL_STACK" if not rules else "ENVOY_PORT"
    warned = invoke([*SEED_ARGS, *rules, "--log_output_level", level, *DRY], {other: "true"})
    lines = [line for line in warned.stderr.splitlines() if line not in shown_1_8]
    if level.endswith("error"):
        assert lines == []
    else:
        assert len(lines) == 1 and f"warning: {other}" in lines[0]
    failed = invoke([*SEED_ARGS, *rules, f"--log_output_level={level}", "-p", "abc"])
    assert failed.code == 2 and failed.stderr.splitlines() == [
        "istio-init: invalid value for -p/--envoy-port: 'abc': not a port number"]


@pytest.mark.parametrize("rules", RULE_SETS, ids=("1.8", "current"))
def test_log_as_json_makes_every_stderr_line_a_json_object(rules: list[str]) -> None:
    result = invoke([*SEED_ARGS, *rules, "--log_output_level=default:info", "--log_as_json", *DRY],
                    {"INVALID_DROP": "true"} if not rules else {})
    assert result.code == 0 and result.stdout == invoke([*SEED_ARGS, *rules, *DRY]).stdout
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(records) > 10
    assert all(set(r) == {"time", "level", "msg"} and r["time"].endswith("Z") for r in records)
    assert any(r["msg"] == "istio-init effective configuration:" and r["level"] == "info" for r in records)
    if not rules:
        assert records[0]["level"] == "warn" and "INVALID_DROP" in records[0]["msg"]
        assert records[1]["level"] == "warn" and "--log_output_level and --log_as_json are" in records[1]["msg"]


def test_log_as_json_error_is_one_json_line() -> None:
    result = invoke([*SEED_ARGS, "--log_as_json", "-c", "eth1"])
    assert result.code == 2
    (line,) = result.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "error" and "--rules-version 1.11 to current" in record["msg"]


def test_log_flag_without_value_is_a_usage_error() -> None:
    result = invoke([*SEED_ARGS, "--log_output_level"])
    assert result.code == 2 and len(result.stderr.splitlines()) == 1
    assert "--log_output_level" in result.stderr


@pytest.mark.root
@pytest.mark.parametrize("rules", RULE_SETS, ids=("1.8", "current"))
def test_real_apply_logs_json_only(netns, rules: list[str]) -> None:
    done = netns.run(sys.executable, "-m", "istio_init", *SEED_ARGS, *rules, "--log_output_level=default:info",
                     "--log_as_json", "--ipv6", "false", env=clean_environ())
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert any("iptables backend" in r["msg"] for r in records)
    assert "-A ISTIO_OUTPUT" in done.stdout
