"""Bad input: one line on stderr naming the flag and value, exit 2, no traceback, nothing applied.

The bad-input runs are not dry runs on purpose: validation must stop a real
apply before any kernel state is read, so these tests need no root either.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from clirun import assert_one_error_line, clean_environ, invoke

BAD_INPUT = [
    # (argv, environment, text the message must contain)
    (["-p", "abc"], {}, "-p/--envoy-port: 'abc'"),
    (["-p", "65536"], {}, "-p/--envoy-port: '65536'"),
    (["-z", "-1"], {}, "-z/--inbound-capture-port: '-1'"),
    (["-b", "80,http"], {}, "-b/--istio-inbound-ports: 'http'"),
    (["-b", "80,70000"], {}, "-b/--istio-inbound-ports: '70000'"),
    (["-d", "15090,x"], {}, "-d/--istio-local-exclude-ports: 'x'"),
    (["-q", "99999"], {}, "-q/--istio-outbound-ports: '99999'"),
    (["-o", "25;"], {}, "-o/--istio-local-outbound-ports-exclude: '25;'"),
    (["-i", "10.0.0.0/33"], {}, "-i/--istio-service-cidr: '10.0.0.0/33'"),
    (["-i", "10.0.0.0/8,not-a-cidr"], {}, "-i/--istio-service-cidr: 'not-a-cidr'"),
    (["-x", "*"], {}, "-x/--istio-service-exclude-cidr: '*'"),
    (["-x", "2001:db8::/129"], {}, "-x/--istio-service-exclude-cidr: '2001:db8::/129'"),
    (["-m", "TPROXYY"], {}, "-m/--istio-inbound-interception-mode: 'TPROXYY'"),
    (["-u", "istio-proxy"], {}, "-u/--proxy-uid: 'istio-proxy'"),
    (["-g", "1337,-5"], {}, "-g/--proxy-gid: '-5'"),
    (["-k", "an-interface-name-too-long"], {}, "-k/--kube-virt-interfaces: 'an-interface-name-too-long'"),
    (["-k", "eth0/1"], {}, "-k/--kube-virt-interfaces: 'eth0/1'"),
    (["-k", "eth0:1"], {}, "-k/--kube-virt-interfaces: 'eth0:1'"),
    (["-k", "eth0 eth1"], {}, "-k/--kube-virt-interfaces: 'eth0 eth1'"),
    (["-i", "10.0.0.0/8;reboot"], {}, "-i/--istio-service-cidr: '10.0.0.0/8;reboot'"),
    (["-b", "$(reboot)"], {}, "-b/--istio-inbound-ports: '$(reboot)'"),
    (["-k", "eth0`id`"], {}, "-k/--kube-virt-interfaces: 'eth0`id`'"),
    (["-t", "mark"], {}, "-t/--istio-inbound-tproxy-mark: 'mark'"),
    (["-r", "254"], {}, "-r/--istio-inbound-tproxy-route-table: '254'"),
    (["--probe-timeout", "5 seconds"], {}, "--probe-timeout: '5 seconds'"),
    (["--iptables-backend", "iptables"], {}, "--iptables-backend: 'iptables'"),
    ([], {"ENVOY_PORT": "fifteen"}, "-p/--envoy-port (from ENVOY_PORT): 'fifteen'"),
    ([], {"ISTIO_SERVICE_EXCLUDE_CIDR": "*"}, "-x/--istio-service-exclude-cidr (from ISTIO_SERVICE_EXCLUDE_CIDR): '*'"),
]


@pytest.mark.parametrize("argv,env,expected", BAD_INPUT, ids=lambda v: str(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_exit_2(argv: list[str], env: dict[str, str], expected: str) -> None:
    assert_one_error_line(invoke(["istio-iptables", *argv], env), expected)


def test_unknown_flag_is_one_line_exit_2() -> None:
    result = invoke(["--no-such-flag"])
    assert result.code == 2
    assert result.stderr.count("\n") == 1 and "--no-such-flag" in result.stderr


def test_bad_input_in_a_real_process_has_no_traceback() -> None:
    out = subprocess.run([sys.executable, "-m", "istio_init", "istio-iptables", "-p", "abc"],
                         capture_output=True, text=True, env=clean_environ(), timeout=60)
    assert out.returncode == 2
    assert out.stderr == "istio-init: invalid value for -p/--envoy-port: 'abc': not a port number\n"


@pytest.mark.root
def test_bad_input_changes_nothing(netns) -> None:
    before = netns.save()
    out = netns.run(sys.executable, "-m", "istio_init", "-i", "*", "-b", "*", "-x", "10.0.0.0/8,bad",
                    check=False, env=clean_environ())
    assert out.returncode == 2 and "'bad'" in out.stderr
    assert netns.save() == before


def test_empty_strings_are_valid_lists() -> None:
    result = invoke(["-x", "", "-b", "", "-d", "", "-i", "", "-q", "", "-o", "", "-k", "", "-n", "--ipv6", "false"])
    assert result.code == 0, result.stderr


@pytest.mark.parametrize("text,seconds", [("5s", 5.0), ("500ms", 0.5), ("1m30s", 90.0), ("2", 2.0)])
def test_probe_timeout_accepts_go_durations(text: str, seconds: float) -> None:
    from istio_init.config import from_sources

    assert from_sources({"probe_timeout": text}, environ={}).probe_timeout == seconds


def test_default_uid_comes_from_envoy_user_else_1337() -> None:
    from istio_init.config import from_sources

    assert from_sources({}, environ={"ENVOY_USER": "root"}).proxy_uids == (0,)
    assert from_sources({}, environ={"ENVOY_USER": "no-such-user-here"}).proxy_uids == (1337,)
    assert from_sources({"proxy_uid": "1500"}, environ={}).proxy_gids == (1500,)


@pytest.mark.root
@pytest.mark.parametrize("backend", ["auto", "libiptc", "legacy", "nft"])
def test_apply_without_net_admin_is_one_line(netns, backend: str) -> None:
    """An init container missing NET_ADMIN gets told so, once, with no traceback."""
    out = netns.run("setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "istio_init",
                    *["-i", "*", "-b", "*", "--iptables-backend", backend], check=False, env=clean_environ())
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "istio-init: needs CAP_NET_ADMIN (run as root with NET_ADMIN, as Istio's init container does; "
        "-n prints the rules without privileges)"]
    assert netns.save() == ""
