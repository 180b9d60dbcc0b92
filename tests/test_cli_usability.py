"""What an operator meets at the command line: help that lists the commands, errors that name
their flag, graph in every format, check's hint for native nftables, nft drift in nft syntax,
"no change" on a converged re-run, the host-namespace warning and the CNI plugin's about text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cases import CASES, SEED_ARGS
from clirun import clean_environ, invoke
from nsutil import Namespace

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = Path(sys.executable).with_name("istio-init-cni")
SEED = list(SEED_ARGS[1:])


# --------------------------------------------------------------------------- help


def test_help_lists_every_command_and_run_is_the_default() -> None:
    text = invoke(["--help"]).stdout
    commands = text[text.index("Commands:"):]
    for name in ("run (default)", "clean", "check", "trace", "graph", "istio-init-cni"):
        assert f"\n  {name} " in commands, (name, commands)
    run_help = invoke(["run", "--help"])
    assert run_help.code == 0 and "`run` is the default command" in " ".join(run_help.stdout.split())
    with_word = invoke(["run", *SEED, "-n", "--ipv6", "false"])
    without = invoke([*SEED, "-n", "--ipv6", "false"])
    assert with_word.code == 0 and with_word.stdout == without.stdout


# --------------------------------------------------------------------------- errors name their flag


@pytest.mark.parametrize("flag", ["--dst", "--src"])
def test_trace_names_the_address_flag(flag: str) -> None:
    conn = {"--dst": "198.51.100.1", "--src": "198.51.100.2"}
    conn[flag] = "foo"
    argv = ["trace", "--direction", "out", "--dport", "80", *[w for k, v in conn.items() for w in (k, v)]]
    result = invoke(argv)
    assert result.code == 2
    assert result.stderr == f"istio-init: invalid value for {flag}: 'foo': not an IPv4 or IPv6 address\n"


# --------------------------------------------------------------------------- graph formats


def test_graph_text_lists_each_rule_and_where_it_leads() -> None:
    result = invoke(["graph", *SEED, "--ipv6", "false", "--format", "text"])
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "IPv4 nat"
    assert "  nat/OUTPUT (built-in)" in lines
    assert "    1: -p tcp -j ISTIO_OUTPUT  -> nat/ISTIO_OUTPUT" in lines
    assert "    4: -m owner --uid-owner 1337 -j RETURN  -> RETURN" in lines
    assert lines[-1] == "    1: -p tcp -j REDIRECT --to-ports 15001  -> REDIRECT :15001"
    rules = [line for line in lines if line.startswith("    ") and "->" in line]
    assert len(rules) == 19 and not any(line.endswith("-> ?") for line in rules)


def test_graph_json_is_the_same_graph_as_dot() -> None:
    result = invoke(["graph", *SEED, "--ipv6", "false", "--format", "json"])
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    dot = invoke(["graph", *SEED, "--ipv6", "false", "--format", "dot"]).stdout
    ids = [node["id"] for cluster in data["clusters"] for node in cluster["nodes"]]
    assert ids and all(f'"{node_id}"' in dot for node_id in ids)
    assert len(data["edges"]) == dot.count(" -> ")
    assert {"source": "nat/OUTPUT", "target": "nat/ISTIO_OUTPUT", "labels": ["1: tcp"]} in data["edges"]


@pytest.mark.root
def test_graph_live_draws_native_nftables(netns: Namespace) -> None:
    args = [*SEED, "--ipv6", "false", "--native-nftables"]
    env = clean_environ()
    netns.run(sys.executable, "-m", "istio_init", *args, env=env)
    live = netns.run(sys.executable, "-m", "istio_init", "graph", "--live", *args, "--format", "text", env=env)
    planned = invoke(["graph", *args, "--format", "text"])
    assert live.stdout == planned.stdout and "nat/ISTIO_OUTPUT" in live.stdout


# --------------------------------------------------------------------------- check


def _check(ns: Namespace, *args: str) -> subprocess.CompletedProcess:
    return ns.run(sys.executable, "-m", "istio_init", "check", *args, check=False, env=clean_environ())


@pytest.mark.root
def test_plain_check_after_a_native_apply_says_where_the_rules_are(netns: Namespace) -> None:
    args = [*SEED, "--ipv6", "false"]
    plain = _check(netns, *args)
    assert plain.returncode == 1 and "hint:" not in plain.stdout  # nothing applied: no hint
    netns.run(sys.executable, "-m", "istio_init", *args, "--native-nftables", env=clean_environ())
    text = _check(netns, *args)
    assert text.returncode == 1
    assert text.stdout.splitlines()[-1].startswith("hint: this namespace holds istio-init's native nftables")
    assert "--native-nftables" in text.stdout.splitlines()[-1]
    as_json = json.loads(_check(netns, *args, "--json").stdout)
    assert "--native-nftables" in as_json["hint"]
    assert _check(netns, *args, "--native-nftables").returncode == 0


@pytest.mark.root
def test_nft_drift_is_shown_in_nft_syntax(netns: Namespace) -> None:
    args = [*SEED, "--ipv6", "false", "--native-nftables"]
    netns.run(sys.executable, "-m", "istio_init", *args, env=clean_environ())
    netns.run("nft", "insert", "rule", "inet", "istio-proxy-nat", "istio-output", "oifname", "lo", "ip", "daddr",
              "10.0.0.0/8", "tcp", "dport", "{", "80,", "443", "}", "counter", "return")
    out = _check(netns, *args).stdout
    assert "extra      nft inet istio-proxy-nat istio-output rule 1: " \
           'oifname "lo" ip daddr 10.0.0.0/8 tcp dport { 80, 443 } return' in out
    assert "{\"" not in out


def _nft_dry_runs() -> list[str]:
    from cases_current import CURRENT_CASES

    texts = []
    for case in CASES:
        texts.append(invoke([*case.argv, "--native-nftables"], case.env).stdout)
    for current in CURRENT_CASES:
        if current.env or current.resolvers:
            continue  # group names and resolvers need files of their own; the shapes recur elsewhere
        texts.append(invoke([*current.argv(), "--native-nftables"]).stdout)
    return [text for text in texts if text]


@pytest.mark.root
def test_nft_syntax_of_every_planned_rule_loads_back_to_the_same_rule(netns: Namespace) -> None:
    """Each rule of both rule sets' nft forms, written in nft syntax by check.nft_rule_text and
    loaded again, reads back as the same expressions: the syntax is nft's, exactly."""
    from istio_init.check import chains_from_objects, nft_rule_text

    compared = 0
    for transaction in _nft_dry_runs():
        netns.run("nft", "flush", "ruleset")
        netns.run("nft", "-f", "-", input=transaction)
        planned = chains_from_objects(json.loads(netns.run("nft", "-j", "list", "ruleset").stdout)["nftables"])
        lines = ["flush ruleset", "add table inet copy"]
        lines += [f"add chain inet copy {t}-{c}" for t, chains in planned.items() for c in chains]
        for table, chains in planned.items():
            for chain, rules in chains.items():
                for rule in rules:
                    text = nft_rule_text(rule).replace("jump istio-", f"jump {table}-istio-")
                    lines.append(f"add rule inet copy {table}-{chain} {text}")
        netns.run("nft", "-f", "-", input="\n".join(lines) + "\n")
        copy = chains_from_objects(json.loads(netns.run("nft", "-j", "list", "ruleset").stdout)["nftables"])["copy"]
        for table, chains in planned.items():
            for chain, rules in chains.items():
                back = [r.replace(f'"{table}-istio-', '"istio-') for r in copy[f"{table}-{chain}"]]
                assert back == rules, (table, chain)
                compared += len(rules)
    assert compared > 500


# --------------------------------------------------------------------------- re-runs and the host


@pytest.mark.root
@pytest.mark.parametrize("extra", [[], ["--native-nftables"]], ids=["iptables", "native-nftables"])
def test_a_converged_rerun_says_no_change_in_one_line(netns: Namespace, extra: list[str]) -> None:
    args = [*SEED, "--ipv6", "false", *extra]
    first = netns.run(sys.executable, "-m", "istio_init", *args, env=clean_environ())
    again = netns.run(sys.executable, "-m", "istio_init", *args, env=clean_environ())
    assert "no change" not in first.stderr
    assert [line for line in again.stderr.splitlines() if "no change" in line] == [
        f"istio-init: no change: the namespace already held exactly these rules "
        f"({'nftables' if extra else 'legacy'})"]
    other = netns.run(sys.executable, "-m", "istio_init", *args, "-d", "15090", env=clean_environ())
    assert "no change" not in other.stderr


_PROBE = "from istio_init.host import namespace; print(namespace.in_initial_namespace())"


def test_the_hosts_namespace_is_recognised() -> None:
    """pid 1's namespace, entered read-only (nothing is changed there), is the host's; a new one is not."""
    try:
        Path("/proc/1/ns/net").stat()
    except OSError as exc:  # a sandbox that hides pid 1 (then istio-init cannot tell, and does not warn)
        pytest.skip(f"pid 1's network namespace cannot be looked at here: {exc.strerror}")
    if subprocess.run(["nsenter", "--net=/proc/1/ns/net", "true"], capture_output=True, timeout=30).returncode:
        pytest.skip("pid 1's network namespace cannot be entered here (needs root in the initial namespaces)")
    host = subprocess.run(["nsenter", "--net=/proc/1/ns/net", sys.executable, "-c", _PROBE],
                          capture_output=True, text=True, timeout=60, env=clean_environ())
    fresh = subprocess.run(["unshare", "--net", sys.executable, "-c", _PROBE],
                           capture_output=True, text=True, timeout=60, env=clean_environ())
    assert (host.stdout, fresh.stdout) == ("True\n", "False\n"), (host.stderr, fresh.stderr)


_AS_IF_HOST = ("import sys; from istio_init.host import namespace; namespace.in_initial_namespace = lambda: True; "
               "from istio_init.entry import main; main(sys.argv[1:])")


@pytest.mark.root
def test_applying_to_the_hosts_namespace_warns(netns: Namespace) -> None:
    args = [*SEED, "--ipv6", "false"]
    warned = netns.run(sys.executable, "-c", _AS_IF_HOST, *args, env=clean_environ())
    assert "warning: applying to the host's own network namespace" in warned.stderr
    assert invoke([*args, "-n"]).stderr.count("host's own") == 0  # a dry run changes nothing: no warning
    pod = netns.run(sys.executable, "-m", "istio_init", *args, env=clean_environ())
    assert "host's own" not in pod.stderr


# --------------------------------------------------------------------------- the CNI plugin, LICENSE


def test_cni_plugin_run_by_hand_says_what_it_is() -> None:
    from istio_init.cni import SUPPORTED_VERSIONS

    done = subprocess.run([str(PLUGIN)], input="", capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert (done.returncode, done.stdout) == (0, "")
    assert done.stderr.startswith("CNI istio-init-cni plugin v")
    assert f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n" in done.stderr


def test_license_is_the_apache_2_0_text_setup_cfg_names() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert "license = Apache-2.0" in (ROOT / "setup.cfg").read_text()
