"""Choosing the rule set, and the flags and variables of the current one (docs/rules-current.md's table).

Like test_config_errors.py: every user mistake is one line naming the flag or
variable and the value, exit 2, nothing applied; a flag of the other rule set
is such a mistake (naming --rules-version), a variable of the other rule set
is one warning line.
"""

from __future__ import annotations

import grp
import sys
from pathlib import Path

import pytest

from cases import SEED_ARGS
from clirun import assert_one_error_line, clean_environ, invoke
from istio_init.config import EVERYTHING, AllOrList, from_sources

CURRENT = ("--rules-version", "current")


def config(given: dict[str, str | bool | None], env: dict[str, str] | None = None):
    return from_sources(given, environ=env or {})


# ---- choosing the rule set -------------------------------------------------------------

@pytest.mark.parametrize("text,name", [
    ("1.8", "1.8"), ("1.8.0", "1.8"), ("1.8.6", "1.8"), ("current", "current"), ("1.25", "current"),
    ("1.28", "current"), ("1.32", "current"), ("1.28.3", "current"), (" current ", "current"),
])
def test_rules_version_names(text: str, name: str) -> None:
    assert config({"rules_version": text}).rules_version == name
    assert config({}, {"ISTIO_INIT_RULES_VERSION": text}).rules_version == name


def test_rules_version_default_is_1_8_and_the_seed_is_unchanged() -> None:
    assert config({}).rules_version == "1.8"
    seed = invoke([*SEED_ARGS, "-n", "--ipv6", "false"])
    assert seed.stdout == (Path(__file__).parent / "golden" / "1.8" / "seed.txt").read_text()
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 22 -j RETURN" in seed.stdout


def test_current_differs_from_1_8_where_the_issue_says() -> None:
    out = invoke([*SEED_ARGS, *CURRENT, "-n", "--ipv6", "false"]).stdout
    assert "--dport 22 " not in out
    assert "-A OUTPUT -j ISTIO_OUTPUT" in out and "-A OUTPUT -p tcp -j ISTIO_OUTPUT" not in out
    assert "! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT" in out


@pytest.mark.parametrize("text", ["1.7", "1.33", "1.100", "2.0", "latest", "1.8.x", "", "1.28.", "v1.28"])
def test_unsupported_rules_version_lists_what_is_supported(text: str) -> None:
    for argv, env, label in (([f"--rules-version={text}"], {}, "--rules-version: "),
                             ([], {"ISTIO_INIT_RULES_VERSION": text}, "(from ISTIO_INIT_RULES_VERSION)")):
        result = invoke([*argv, "-n"], env)
        assert result.code == 2
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and label in lines[0]
        assert "supported: an Istio version 1.8 to 1.32 (such as 1.20 or 1.20.3), or current" in lines[0]


# ---- flags and variables of the other rule set ------------------------------------------

CURRENT_ONLY_FLAGS = [
    ["-c", "eth1"], ["--istio-exclude-interfaces", "eth1"], ["--drop-invalid"], ["--capture-all-dns"],
    ["--dual-stack"], ["--cni-mode"], ["--reconcile"], ["--force-apply"], ["--force-iptables-binary", "nft"],
]


@pytest.mark.parametrize("argv", CURRENT_ONLY_FLAGS, ids=lambda a: a[0])
def test_current_only_flag_under_1_8_is_a_usage_error_naming_rules_version(argv: list[str]) -> None:
    result = invoke([*SEED_ARGS, *argv])
    assert result.code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "exists only with --rules-version " in lines[0] and "current (Istio 1." in lines[0]
    assert lines[0].endswith("; this run uses 1.8)")
    assert invoke([*SEED_ARGS, *CURRENT, *argv, "-n", "--ipv6", "false"]).code == 0


def test_1_8_only_flag_under_current_is_a_usage_error() -> None:
    result = invoke([*CURRENT, "--multiport", "-n"])
    assert result.code == 2
    assert "--multiport" in result.stderr and "exists only with --rules-version 1.8" in result.stderr


@pytest.mark.root
@pytest.mark.parametrize("argv", CURRENT_ONLY_FLAGS[:3], ids=lambda a: a[0])
def test_current_only_flag_under_1_8_leaves_the_namespace_untouched(netns, argv: list[str]) -> None:
    before = netns.save(), netns.save("iptables-nft-save")
    done = netns.run(sys.executable, "-m", "istio_init", *SEED_ARGS, *argv, env=clean_environ(), check=False)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert (netns.save(), netns.save("iptables-nft-save")) == before


CURRENT_ONLY_VARIABLES = ["ISTIO_EXCLUDE_INTERFACES", "DROP_INVALID", "INVALID_DROP", "DUAL_STACK",
                          "ISTIO_DUAL_STACK", "CAPTURE_ALL_DNS", "CNI_MODE", "RECONCILE", "FORCE_APPLY",
                          "FORCE_IPTABLES_BINARY", "ISTIO_OUTBOUND_OWNER_GROUPS",
                          "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"]


@pytest.mark.parametrize("name", CURRENT_ONLY_VARIABLES)
def test_current_only_variable_under_1_8_is_one_warning_and_no_change(name: str) -> None:
    plain = invoke([*SEED_ARGS, "-n", "--ipv6", "false"])
    result = invoke([*SEED_ARGS, "-n", "--ipv6", "false"], {name: "true"})
    assert result.code == 0 and result.stdout == plain.stdout
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"istio-init: warning: {name} is read only with --rules-version ")
    assert warnings[0].endswith("current; ignored (this run uses 1.8)")


def test_envoy_port_variable_is_ignored_with_a_warning_under_current() -> None:
    result = invoke([*CURRENT, "-n", "--ipv6", "false"], {"ENVOY_PORT": "16001"})
    assert "--to-ports 15001" in result.stdout and "16001" not in result.stdout
    assert "istio-init: warning: ENVOY_PORT is read only with --rules-version 1.8; ignored (this run uses current)" \
        in result.stderr.splitlines()
    assert "--to-ports 16001" in invoke(["-n", "--ipv6", "false"], {"ENVOY_PORT": "16001"}).stdout


def test_no_warning_for_variables_both_rule_sets_read() -> None:
    for argv in ([], list(CURRENT)):
        result = invoke([*argv, "-n", "--ipv6", "false"], {"ISTIO_META_DNS_CAPTURE": "false", "PROXY_UID": "1337"})
        assert "warning" not in result.stderr


# ---- values of the current flags ----------------------------------------------------------

BAD_CURRENT_INPUT = [
    (["-c", "eth0/1"], {}, "-c/--istio-exclude-interfaces: 'eth0/1'"),
    (["-c", "an-interface-name-too-long"], {}, "-c/--istio-exclude-interfaces: 'an-interface-name-too-long'"),
    (["-c", "eth0;id"], {}, "-c/--istio-exclude-interfaces: 'eth0;id'"),
    ([], {"ISTIO_EXCLUDE_INTERFACES": "a b"}, "-c/--istio-exclude-interfaces (from ISTIO_EXCLUDE_INTERFACES): 'a b'"),
    ([], {"DROP_INVALID": "maybe"}, "--drop-invalid (from DROP_INVALID): 'maybe'"),
    ([], {"INVALID_DROP": "maybe"}, "--drop-invalid (from INVALID_DROP): 'maybe'"),
    ([], {"DUAL_STACK": "2"}, "--dual-stack (from DUAL_STACK): '2'"),
    ([], {"ISTIO_DUAL_STACK": "yes please"}, "--dual-stack (from ISTIO_DUAL_STACK): 'yes please'"),
    ([], {"CAPTURE_ALL_DNS": "all"}, "--capture-all-dns (from CAPTURE_ALL_DNS): 'all'"),
    ([], {"CNI_MODE": "cni"}, "--cni-mode (from CNI_MODE): 'cni'"),
    ([], {"RECONCILE": "x"}, "--reconcile (from RECONCILE): 'x'"),
    ([], {"FORCE_APPLY": "x"}, "--force-apply (from FORCE_APPLY): 'x'"),
    ([], {"ISTIO_META_DNS_CAPTURE": "sometimes"}, "--redirect-dns (from ISTIO_META_DNS_CAPTURE): 'sometimes'"),
    (["--force-iptables-binary", "iptables"], {}, "--force-iptables-binary: 'iptables'"),
    ([], {"FORCE_IPTABLES_BINARY": "legacyy"}, "--force-iptables-binary (from FORCE_IPTABLES_BINARY): 'legacyy'"),
    (["--force-iptables-binary", "nft", "--iptables-backend", "legacy"], {}, "--force-iptables-binary: 'nft'"),
    ([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "no-such-group-here"},
     "ISTIO_OUTBOUND_OWNER_GROUPS: 'no-such-group-here': no such group"),
    ([], {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "1,no-such-group-here"},
     "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE: 'no-such-group-here'"),
    ([], {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(str(g) for g in range(100, 165))},
     "ISTIO_OUTBOUND_OWNER_GROUPS: '100,101,"),
    ([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "4294967295"}, "ISTIO_OUTBOUND_OWNER_GROUPS: '4294967295'"),
    ([], {"ISTIO_OUTBOUND_OWNER_GROUPS": "java;id"}, "ISTIO_OUTBOUND_OWNER_GROUPS: 'java;id'"),
    ([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.1/8"}, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: '10.0.0.1/8'"),
    ([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/7"}, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: '127.0.0.1/7'"),
    ([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1"}, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: '127.0.0.1'"),
    ([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "::1/128"}, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: '::1/128'"),
    ([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "loopback"}, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR: 'loopback'"),
    (["-i", "10.0.0.1"], {}, "-i/--istio-service-cidr: '10.0.0.1': a CIDR needs a prefix length"),
    (["-x", "2001:db8::1"], {}, "-x/--istio-service-exclude-cidr: '2001:db8::1'"),
    (["--log_output_level=default:verbose"], {}, "--log_output_level: 'default:verbose'"),
    (["--log_output_level", "loud"], {}, "--log_output_level: 'loud'"),
    (["--log_stacktrace_level=default:sometimes"], {}, "--log_stacktrace_level: 'default:sometimes'"),
    (["--log_as_json=maybe"], {}, "--log_as_json: 'maybe'"),
]


@pytest.mark.parametrize("argv,env,expected", BAD_CURRENT_INPUT,
                         ids=lambda v: str(v)[:60] if isinstance(v, (list, dict)) else None)
def test_bad_current_input_is_one_line_exit_2(argv: list[str], env: dict[str, str], expected: str) -> None:
    assert_one_error_line(invoke(["istio-iptables", *CURRENT, *argv], env), expected)


@pytest.mark.root
def test_bad_current_input_changes_nothing(netns) -> None:
    before = netns.save(), netns.save("iptables-nft-save")
    for argv, env, _ in BAD_CURRENT_INPUT:
        done = netns.run(sys.executable, "-m", "istio_init", *CURRENT, *argv, env=clean_environ(env), check=False)
        assert done.returncode == 2, (argv, env, done.stderr)
    assert (netns.save(), netns.save("iptables-nft-save")) == before


def test_sixty_four_owner_groups_are_allowed_and_exclude_has_no_limit() -> None:
    many = ",".join(str(g) for g in range(100, 164))
    assert config({"rules_version": "current"}, {"ISTIO_OUTBOUND_OWNER_GROUPS": many}).owner_groups_include \
        == AllOrList(False, tuple(range(100, 164)))
    more = ",".join(str(g) for g in range(100, 300))
    assert len(config({"rules_version": "current"},
                      {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": more}).owner_groups_exclude) == 200


def test_owner_group_names_are_resolved_to_gids() -> None:
    name = grp.getgrgid(0).gr_name  # every system has gid 0
    cfg = config({"rules_version": "current"}, {"ISTIO_OUTBOUND_OWNER_GROUPS": f"{name},202"})
    assert cfg.owner_groups_include == AllOrList(False, (0, 202))
    out = invoke([*CURRENT, "-n", "--ipv6", "false"], {"ISTIO_OUTBOUND_OWNER_GROUPS": f"{name},202"}).stdout
    assert "-A ISTIO_OUTPUT -m owner ! --gid-owner 0 -m owner ! --gid-owner 202 -j RETURN" in out
    assert config({"rules_version": "current"}, {"ISTIO_OUTBOUND_OWNER_GROUPS": "*"}).owner_groups_include == EVERYTHING


def test_loopback_cidr_is_written_in_network_form() -> None:
    cfg = config({"rules_version": "current"}, {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/8"})
    assert cfg.ipv4_loopback_cidr == "127.0.0.0/8"
    assert config({"rules_version": "current"}).ipv4_loopback_cidr == "127.0.0.1/32"


@pytest.mark.parametrize("dest,main,alias", [
    ("drop_invalid", "DROP_INVALID", "INVALID_DROP"),
    ("dual_stack", "DUAL_STACK", "ISTIO_DUAL_STACK"),
])
def test_env_alias_wins_and_a_flag_beats_both(dest: str, main: str, alias: str) -> None:
    current = {"rules_version": "current"}
    assert getattr(config(current, {main: "true"}), dest) is True
    assert getattr(config(current, {alias: "true"}), dest) is True
    assert getattr(config(current, {main: "false", alias: "true"}), dest) is True
    assert getattr(config(current, {main: "true", alias: "false"}), dest) is False
    assert getattr(config({**current, dest: True}, {main: "false", alias: "false"}), dest) is True


def test_dns_capture_alias_wins_under_current_and_1_8_keeps_its_or() -> None:
    current = {"rules_version": "current"}
    assert config(current, {"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "false"}).dns_capture is False
    assert config(current, {"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true"}).dns_capture is True
    assert config({**current, "redirect_dns": True}, {"ISTIO_META_DNS_CAPTURE": "false"}).dns_capture is True
    assert config({}, {"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "false"}).dns_capture is True
    assert config({}, {"ISTIO_META_DNS_CAPTURE": "sometimes"}).dns_capture is False


def test_force_iptables_binary_maps_onto_the_backend() -> None:
    current = {"rules_version": "current"}
    assert config({**current, "force_iptables_binary": "nft"}).iptables_backend == "nft"
    assert config(current, {"FORCE_IPTABLES_BINARY": "legacy"}).iptables_backend == "legacy"
    assert config({**current, "force_iptables_binary": "nft", "iptables_backend": "nft"}).iptables_backend == "nft"
    assert config(current).iptables_backend == "auto"


def test_accepted_compatibility_switches() -> None:
    cfg = config({"rules_version": "current", "reconcile": True, "force_apply": True, "cni_mode": True})
    assert (cfg.reconcile, cfg.force_apply, cfg.cni_mode) == (True, True, True)


# ---- resolvers and IP family ---------------------------------------------------------------

def test_dns_capture_without_a_resolver_is_off_with_a_warning(tmp_path: Path) -> None:
    empty = tmp_path / "resolv.conf"
    empty.write_text("# no nameserver\nsearch example.test\n")
    plain = invoke([*CURRENT, "-n", "--ipv6", "false"])
    for path in (empty, tmp_path / "missing"):
        result = invoke([*CURRENT, "--redirect-dns", "-n", "--ipv6", "false"], {"ISTIO_INIT_RESOLV_CONF": str(path)})
        assert result.code == 0 and result.stdout == plain.stdout
        warnings = [line for line in result.stderr.splitlines() if "warning" in line]
        assert len(warnings) == 1 and "DNS is not captured" in warnings[0] and str(path) in warnings[0]


def _dry_run_with_resolv_conf(path: str) -> "subprocess.CompletedProcess[str]":
    """A DNS-capturing dry run in a child bounded in time and memory (a hang or a runaway read fails)."""
    import resource
    import subprocess

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run([sys.executable, "-m", "istio_init", *CURRENT, "--redirect-dns", "-n", "--ipv6", "false"],
                          env=clean_environ({"ISTIO_INIT_RESOLV_CONF": path}), text=True, capture_output=True,
                          timeout=20, preexec_fn=limit)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory", "huge"])
def test_a_resolv_conf_that_is_no_file_is_read_boundedly_and_named(tmp_path: Path, kind: str) -> None:
    """issue 19, finding 6: a FIFO hung the run forever and /dev/zero read until memory ran out."""
    import os

    path = {"fifo": str(tmp_path / "fifo"), "/dev/zero": "/dev/zero", "directory": str(tmp_path),
            "huge": str(tmp_path / "huge")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "huge":
        Path(path).write_text("nameserver 192.0.2.53\n" + "#" * (1 << 20))
    plain = invoke([*CURRENT, "-n", "--ipv6", "false"])
    result = _dry_run_with_resolv_conf(path)
    assert result.returncode == 0 and result.stdout == plain.stdout, result.stderr[-500:]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    reason = {"fifo": "not a regular file (a FIFO)", "/dev/zero": "not a regular file (a character device)",
              "directory": "not a regular file (a directory)", "huge": "is larger than 65536 bytes"}[kind]
    assert len(warnings) == 1 and f"{path} " in warnings[0] and reason in warnings[0], warnings


def test_resolvers_are_split_by_family_and_capture_all_needs_none(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver fe80::1%eth0\noptions ndots:5\n")
    env = {"ISTIO_INIT_RESOLV_CONF": str(conf)}
    v4, v6 = invoke([*CURRENT, "--redirect-dns", "-n", "--ipv6", "true"], env).stdout.split("# IPv6\n")
    assert "-d 192.0.2.53/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in v4
    assert "2001:db8::53" not in v4 and "192.0.2.53" not in v6
    assert "-d 2001:db8::53/128 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053" in v6
    assert "fe80" not in v4 + v6
    everything = invoke([*CURRENT, "--redirect-dns", "--capture-all-dns", "-n", "--ipv6", "false"],
                        {"ISTIO_INIT_RESOLV_CONF": str(tmp_path / "missing")})
    assert "warning" not in everything.stderr
    assert "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in everything.stdout
    assert "-A ISTIO_INBOUND -p udp -m udp --sport 53 -j CT --zone 1" in everything.stdout


@pytest.mark.root
@pytest.mark.parametrize("args,ipv6", [
    ((), False),                       # first address IPv4: no IPv6 rules
    (("--dual-stack",), True),         # any IPv6 address: IPv6 rules
])
def test_dual_stack_makes_ipv6_rules_when_any_address_is_ipv6(netns, args: tuple[str, ...], ipv6: bool) -> None:
    netns.add_address("192.0.2.10/24")
    netns.add_address("2001:db8::10/64")
    out = netns.run(sys.executable, "-m", "istio_init", *CURRENT, *args, "-n", env=clean_environ())
    assert ("# IPv6" in out.stdout.splitlines()) == ipv6
    via_env = netns.run(sys.executable, "-m", "istio_init", *CURRENT, "-n",
                        env=clean_environ({"ISTIO_DUAL_STACK": "true"} if ipv6 else {}))
    assert via_env.stdout == out.stdout


@pytest.mark.root
def test_pod_without_an_address_gets_ipv4_rules_and_a_warning(netns) -> None:
    out = netns.run(sys.executable, "-m", "istio_init", *CURRENT, "-n", env=clean_environ())
    assert "# IPv6" not in out.stdout.splitlines() and "-A OUTPUT -j ISTIO_OUTPUT" in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    assert warnings == ["istio-init: warning: the pod has no address but loopback and link-local ones; "
                        "making IPv4 rules only"]
    netns.add_address("2001:db8::10/64")
    out = netns.run(sys.executable, "-m", "istio_init", *CURRENT, "-n", env=clean_environ())
    assert "# IPv6" in out.stdout.splitlines() and "warning" not in out.stderr


def test_trace_from_the_plan_uses_the_pods_resolvers(tmp_path: Path) -> None:
    import json

    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 198.51.100.53\n")
    query = ["trace", *CURRENT, "--redirect-dns", "-i", "*", "--ipv6", "false", "--direction", "out",
             "--dport", "53", "--protocol", "udp", "--uid", "1000", "--gid", "1000", "--json"]
    env = {"ISTIO_INIT_RESOLV_CONF": str(conf)}
    to_resolver = json.loads(invoke([*query, "--dst", "198.51.100.53"], env).stdout)
    assert to_resolver["captured"] and to_resolver["to_port"] == 15053
    elsewhere = json.loads(invoke([*query, "--dst", "198.51.100.54"], env).stdout)
    assert not elsewhere["captured"]
