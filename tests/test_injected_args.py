"""Each release's injected init-container args, verbatim, under its rule set (and 1.8's warning).

The args are what each release's injection template writes with the chart's
defaults (no pod annotations, istio-cni off): istio/istio, at the tag named,
`manifests/charts/istio-control/istio-discovery/files/injection-template.yaml`,
the `istio-init` container's `args:` with `.Values.global.proxy` defaults
(`includeIPRanges: "*"`, `excludeIPRanges: ""`, `includeInboundPorts: "*"`,
`statusPort: 15020`), interception mode REDIRECT, `logging.level:
"default:info"`; 1.24's also with `proxy_init.forceApplyIptables: true`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from clirun import clean_environ, invoke
from istio_init.config import RULE_SET_RELEASES
from istio_init.rulesets.istio_1_9_to_1_24 import GENERATIONS
from nsutil import Namespace

_BASE = ("istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
         "-b", "*", "-d", "15090,15021,15020")
_LOG = ("--log_output_level=default:info",)
INJECTED = {  # rule set -> (the release whose template wrote the args, the args)
    "1.8": ("1.8.6", _BASE),
    "1.9": ("1.10.6", _BASE),
    "1.11": ("1.11.8", _BASE),
    "1.12": ("1.12.9", _BASE),
    "1.13": ("1.17.8", _BASE + _LOG),
    "1.18": ("1.19.10", _BASE + _LOG),
    "1.20": ("1.21.6", _BASE + _LOG),
    "1.23": ("1.23.6", _BASE + _LOG),
    "1.24": ("1.24.6", _BASE + _LOG + ("--force-apply",)),
    "current": ("1.28.0", _BASE + _LOG),
}
TRAITS = {generation.name: generation for generation in GENERATIONS}


def _argv(rule_set: str) -> list[str]:
    tag, args = INJECTED[rule_set]
    return [*args, "--rules-version", tag, "--ipv6", "false"]


def test_every_rule_set_has_its_injected_args() -> None:
    assert set(INJECTED) == set(RULE_SET_RELEASES)


@pytest.mark.parametrize("rule_set", sorted(INJECTED))
def test_injected_args_give_the_rule_sets_rules_without_a_warning(rule_set: str) -> None:
    result = invoke([*_argv(rule_set), "-n"])
    assert result.code == 0, result.stderr
    assert "warning" not in result.stderr
    assert f"  rules_version: {rule_set}" in result.stderr.splitlines()
    out = result.stdout
    # Where the rule sets differ for these args: port 22 (kept up to 1.12), the loopback
    # rules' tunnel port (1.18 on), the UDP jump (current).
    generation = TRAITS.get(rule_set)
    keeps_ssh = rule_set == "1.8" or (generation is not None and generation.ssh_kept)
    assert ("-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN" in out) == keeps_ssh
    tunnel = rule_set == "current" or (generation is not None and generation.tunnel_port_on_loopback)
    assert ("-p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT" in out) == tunnel
    assert ("-A OUTPUT -j ISTIO_OUTPUT" in out) == (rule_set == "current")


def test_current_args_under_the_1_8_default_warn_once_naming_the_releases() -> None:
    _, args = INJECTED["current"]
    result = invoke([*args, "-n", "--ipv6", "false"])
    assert result.code == 0
    plain = invoke([*_BASE, "-n", "--ipv6", "false"])
    assert result.stdout == plain.stdout  # still 1.8's rules
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == ["istio-init: warning: --log_output_level is in the init container args of Istio 1.15-1.32 "
                        "(their rules: --rules-version 1.13 to current); this run installs Istio 1.8's rules "
                        "(--rules-version 1.8)"]
    assert "warning" not in plain.stderr


@pytest.mark.root
@pytest.mark.parametrize("rule_set", sorted(INJECTED))
def test_injected_args_apply(rule_set: str, netns: Namespace, tmp_path: Path) -> None:
    env = clean_environ({"ISTIO_INIT_LOCKFILE": str(tmp_path / "lock"), "XTABLES_LOCKFILE": str(tmp_path / "xlock")})
    done = netns.run(sys.executable, "-m", "istio_init", *_argv(rule_set), "--iptables-backend", "legacy", env=env,
                     check=False)
    assert done.returncode == 0, done.stderr
    dry = invoke([*_argv(rule_set), "-n"]).stdout
    saved = netns.save("iptables-legacy-save")
    for line in dry.splitlines():
        if line.startswith("-A "):
            assert line in saved.splitlines()
    assert sum(line.startswith("-A ") for line in saved.splitlines()) == sum(
        line.startswith("-A ") for line in dry.splitlines())
