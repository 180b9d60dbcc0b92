"""Property tests (Hypothesis): whatever a pod spec says, the outcome is one of two.

For random values of every flag and variable of config.FLAGS (and the two
variables outside the table, ENVOY_USER and ISTIO_META_DNS_CAPTURE), a run
either exits 0 with rules the kernel loads, or exits 2 with one stderr line
naming the flag (and the variable, when the value came from one). Never a
traceback, never exit 1. For real applies into a namespace holding the seed
rules, a refusal leaves the namespace byte for byte as it was.

Values are drawn per kind of flag (ports, id lists, CIDR lists, interface
names, marks, durations, words), from near-valid shapes, digits of other
scripts, huge numbers and arbitrary text; a flag added to FLAGS later gets
arbitrary text. Every test is bounded (max_examples, deadline) and
deterministic (derandomize=True, no example database), so CI sees the same
examples on every run.
"""

from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from clirun import invoke
from hostile import SEED, istio_init, pod_namespace, snapshot
from istio_init import ifnames
from istio_init.config import FLAGS, FLAGS_BY_DEST, from_sources
from istio_init.errors import ConfigError
from istio_init.iptables_save.write import split_families
from nsutil import Namespace

EXTRA_VARIABLES = ("ENVOY_USER", "ISTIO_META_DNS_CAPTURE")
LABEL_BY_TEXT = {spec.label: spec for spec in FLAGS}


def _bounded(max_examples: int, deadline_ms: int) -> settings:
    return settings(max_examples=max_examples, deadline=deadline_ms, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


# ---- values -----------------------------------------------------------------------------

# Digits of other scripts (they pass str.isdigit() and int()), separators int() takes, signs.
_DIGIT_SETS = ["0123456789", "٠١٢٣٤٥٦٧٨٩", "０１２３４５６７８９", "०१२३४५६७८९", "²³¹⁰⁵", "𝟎𝟏𝟐𝟑𝟓",
               "0123456789_", "0123456789 +-.,xXeE", "0123456789²١５"]
_SCRIPT_NUMBER = st.sampled_from(_DIGIT_SETS).flatmap(lambda digits: st.text(alphabet=digits, min_size=1, max_size=6))
_NUMBERISH = st.one_of(
    _SCRIPT_NUMBER,
    _SCRIPT_NUMBER,
    st.integers(-5, 70000).map(str),
    st.integers(0, 2**33).map(str),
    st.integers(11, 6000).map(lambda n: "9" * n),
    st.integers(0, 2**32).map(hex),
)
_ANY = st.text(max_size=24)
_HOSTILE_CHARS = st.text(alphabet="abc019éàДР✓ -+*/:,.!;$`'\"\\\x00\x07\x85\u00a0\u2003\u200b\u2028\udcff",
                         max_size=16)


def _list_of(item: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(item, max_size=5).map(",".join)


_CIDRISH = st.one_of(
    st.tuples(st.ip_addresses(), st.integers(0, 130)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.ip_addresses().map(str),
    st.text(alphabet="0123456789./:abcdef١２", max_size=18),
)
_IFNAME = st.one_of(
    st.sampled_from(["eth1", "vnet+", "éééééééx", "ДОБРО", "-j", "a" * 15, "a" * 16, "✓", "a\u2003b"]),
    st.text(alphabet="abcxyz019-+_.:/éàДР✓ \u00a0\u2003\u200b", min_size=1, max_size=17),
)
_DURATIONISH = st.one_of(
    st.tuples(_NUMBERISH, st.sampled_from(["", "s", "ms", "us", "µs", "μs", "ns", "m", "h", "d", "S"])).map("".join),
    st.sampled_from(["inf", "nan", "1m30s", "1.5s", ".5s", "5.s", "9" * 400 + "s"]),
)
_WORDS = {
    "inbound_interception_mode": ["REDIRECT", "TPROXY", "tproxy", "redirect", "TPROXYY", "REDİRECT", ""],
    "iptables_backend": ["auto", "libiptc", "legacy", "nft", "NFT", "iptables", ""],
    "ipv6": ["auto", "true", "false", "1", "0", "maybe", ""],
}
_SWITCH_WORDS = ["true", "false", "1", "0", "yes", "no", "on", "off", "TRUE", "", "ja", "trüe"]
_KINDS: dict[str, st.SearchStrategy[str]] = {
    **{d: _NUMBERISH for d in ("envoy_port", "inbound_capture_port", "inbound_tunnel_port", "iptables_probe_port",
                               "tproxy_mark", "tproxy_route_table")},
    **{d: st.one_of(st.just("*"), _list_of(_NUMBERISH))
       for d in ("inbound_ports", "local_exclude_ports", "outbound_ports", "outbound_ports_exclude")},
    **{d: _list_of(_NUMBERISH) for d in ("proxy_uid", "proxy_gid")},
    **{d: st.one_of(st.just("*"), _list_of(_CIDRISH)) for d in ("service_cidr", "service_exclude_cidr")},
    "kube_virt_interfaces": _list_of(_IFNAME),
    "probe_timeout": _DURATIONISH,
}


def value_for(dest: str) -> st.SearchStrategy[str]:
    """Values for one flag: its kind's shapes mostly, arbitrary or hostile text sometimes."""
    spec = FLAGS_BY_DEST[dest]
    if dest in _KINDS:
        shaped = _KINDS[dest]
    elif dest in _WORDS:
        shaped = st.sampled_from(_WORDS[dest])
    elif spec.is_switch:
        shaped = st.sampled_from(_SWITCH_WORDS)
    else:
        shaped = _ANY
    return st.one_of(shaped, shaped, _HOSTILE_CHARS, _ANY)


_PORT = st.integers(0, 65535).map(str)
_VALID_IFNAME = st.text(alphabet="abcxyz0159._+é✓", min_size=1, max_size=7).filter(
    lambda n: not n.startswith("-") and n not in (".", ".."))
_VALID: dict[str, st.SearchStrategy[str]] = {
    **{d: _PORT for d in ("envoy_port", "inbound_capture_port", "inbound_tunnel_port", "iptables_probe_port")},
    **{d: st.one_of(st.just("*"), st.lists(_PORT, max_size=4).map(",".join))
       for d in ("inbound_ports", "local_exclude_ports", "outbound_ports", "outbound_ports_exclude")},
    **{d: st.lists(st.integers(0, 2**32 - 2).map(str), min_size=1, max_size=3).map(",".join)
       for d in ("proxy_uid", "proxy_gid")},
    "service_cidr": st.one_of(st.just("*"), st.lists(st.one_of(
        st.tuples(st.ip_addresses(v=4), st.integers(0, 32)), st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
    ).map(lambda t: f"{t[0]}/{t[1]}"), max_size=3).map(",".join)),
    "service_exclude_cidr": st.lists(st.sampled_from(["10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32", "0.0.0.0/0",
                                                      "127.0.0.1", "::1/128", "198.51.100.7/33"]),
                                     max_size=3).map(",".join),
    "kube_virt_interfaces": st.lists(_VALID_IFNAME, max_size=3).map(",".join),
    "tproxy_mark": st.one_of(st.integers(1, 2**32 - 1).map(str), st.integers(1, 2**32 - 1).map(hex)),
    "tproxy_route_table": st.integers(1, 2**32 - 1).filter(lambda t: t not in (253, 254, 255)).map(str),
    "probe_timeout": st.tuples(st.integers(0, 3600), st.sampled_from(["s", "ms", ""])).map(
        lambda t: f"{t[0]}{t[1]}"),
    "inbound_interception_mode": st.sampled_from(["REDIRECT", "TPROXY", "tproxy"]),
    "iptables_backend": st.sampled_from(["auto", "libiptc", "legacy", "nft"]),
    "ipv6": st.sampled_from(["auto", "true", "false"]),
    "network_namespace": st.just(""),
}


def valid_for(dest: str) -> st.SearchStrategy[str]:
    """Values the flag should take (a flag added to FLAGS later: its default)."""
    spec = FLAGS_BY_DEST[dest]
    if dest in _VALID:
        return _VALID[dest]
    if spec.is_switch:
        return st.sampled_from(["true", "false", "1", "0", ""])
    return st.just(spec.default)


def _passable(text: str) -> bool:
    """What argv and environment can carry at all: no NUL, bytes only (lone surrogates from undecodable bytes)."""
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


@st.composite
def invocations(draw: st.DrawFn, exclude: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str], dict]:
    """(argv, environment, flag values by dest): a random subset of the flags, each on the command line or
    as its variable."""
    argv: list[str] = []
    env: dict[str, str] = {}
    given_flags: dict[str, str | bool] = {}
    # Most flags get values they should take, and at most one a hostile one: with
    # every value hostile, nearly every example is refused at the first flag.
    candidates = [spec.dest for spec in FLAGS if spec.dest not in exclude]
    hostile = draw(st.one_of(st.none(), st.sampled_from(candidates)))
    for spec in FLAGS:
        if spec.dest in exclude:
            continue
        if spec.env_only:  # a variable with no flag (the owner groups, the loopback CIDR)
            where = draw(st.sampled_from(["absent", "absent", "env"]))
        else:
            where = draw(st.sampled_from(["absent", "absent", "flag", "env"] if spec.env else ["absent", "flag"]))
        if spec.dest == hostile and where == "absent":
            where = "env" if spec.env_only else "flag"
        if where == "absent":
            continue
        if spec.is_switch and where == "flag":
            argv.append(f"--{spec.long}")
            given_flags[spec.dest] = True
            continue
        strategy = value_for(spec.dest) if spec.dest == hostile else valid_for(spec.dest)
        value = draw(strategy.filter(_passable))
        if where == "flag":
            argv += [f"--{spec.long}", value]
            given_flags[spec.dest] = value
        else:
            env[spec.env] = value  # type: ignore[index]
    for name in EXTRA_VARIABLES:
        if draw(st.booleans()):
            env[name] = draw(st.one_of(st.sampled_from(["true", "istio-proxy", "root", "nobody", "TRUE"]),
                                       _ANY).filter(_passable))
    return argv, env, given_flags


def _named_spec(line: str, argv: list[str], env: dict[str, str]) -> None:
    """The refusal line names a flag that was given, and its variable when the value came from one."""
    assert line.startswith("istio-init: invalid value for "), line
    label = line[len("istio-init: invalid value for "):].split(": ", 1)[0]
    flag, _, source = label.partition(" (from ")
    spec = LABEL_BY_TEXT[flag]
    if spec.env_only:
        assert spec.env in env, (label, env)
    elif source:
        variable = source.rstrip(")")
        assert variable == spec.env and variable in env or variable == "-u", (label, env)
    else:
        given = {f"--{spec.long}"} | ({f"-{spec.short}"} if spec.short else set())
        assert given & set(argv) or spec.dest == "proxy_uid", (label, argv)


# ---- pure: the Config, for every flag and variable including the switches --------------------


@_bounded(max_examples=250, deadline_ms=2000)
@given(invocations())
def test_every_value_is_a_config_or_one_config_error(case: tuple[list[str], dict[str, str], dict]) -> None:
    argv, env, given_flags = case
    try:
        config = from_sources(given_flags, env)
    except ConfigError as exc:
        event("refused")
        message = str(exc)
        assert "\n" not in message and len(message) < 600, message
        _named_spec(f"istio-init: {message}", argv, env)
        return
    assert all(0 <= p <= 65535 for p in (config.envoy_port, config.inbound_capture_port,
                                          config.inbound_tunnel_port, config.iptables_probe_port))
    assert 0 <= config.probe_timeout <= 3600
    for name in config.kube_virt_interfaces:
        assert ifnames.kernel_refusal(name) is None and ifnames.common_refusal(name) is None


# ---- the CLI's dry run: exit 0 with text that loads, or exit 2 with one line --------------------


def _loads(ns: Namespace, text: str) -> None:
    """The dry run's text loads: iptables-save text with the restore tools, a native nft transaction with nft."""
    if text.startswith("add table inet "):
        done = subprocess.run(["nsenter", f"--net={ns.path}", "nft", "--check", "-f", "-"],
                              input=text.encode(), capture_output=True, timeout=30)
        assert done.returncode == 0, ("nft --check", done.stderr.decode(errors="replace"), text)
        return
    v4, v6 = split_families(text)
    for tool, part in (("iptables-legacy-restore", v4), ("ip6tables-legacy-restore", v6),
                       ("iptables-nft-restore", v4)):
        if part.strip():
            done = subprocess.run(["nsenter", f"--net={ns.path}", tool, "--test", "--noflush"],
                                  input=part.encode(), capture_output=True, timeout=30)
            assert done.returncode == 0, (tool, done.stderr.decode(errors="replace"), part)


def _resolved_namespace(given_flags: dict, env: dict[str, str]) -> str | None:
    value = given_flags.get("network_namespace", env.get("NETWORK_NAMESPACE"))
    if value is None or not value.strip(" "):
        return None
    value = value.strip(" ")
    return value if "/" in value else os.path.join("/run/netns", value)


@pytest.mark.root
@_bounded(max_examples=150, deadline_ms=5000)
@given(invocations())
def test_dry_run_exits_0_with_loadable_rules_or_2_with_one_line(
        module_netns: Namespace, case: tuple[list[str], dict[str, str], dict]) -> None:
    argv, env, given_flags = case
    path = _resolved_namespace(given_flags, env)
    # In-process, so a namespace that exists would be entered by this test process;
    # entering one is covered by the real applies below.
    assume(path is None or not os.path.exists(path.encode("utf-8", "surrogateescape")))
    result = invoke(["istio-iptables", "-n", *argv], env)
    event(f"exit {result.code}")
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr, result.stderr
    assert result.code in (0, 2), (result.code, result.stderr[-2000:])
    if result.code == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        _named_spec(lines[0], argv, env)
        assert result.stdout == ""
    else:
        assert path is None
        _loads(module_netns, result.stdout)


# ---- real applies into a seeded namespace --------------------------------------------------


@pytest.fixture(scope="module")
def seeded() -> Iterator[Namespace]:
    """A pod namespace holding the seed rules (re-applied after every example that changed them)."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces (run as root, or scripts/test-in-docker)")
    ns = pod_namespace("hypa")
    try:
        assert istio_init(ns, *SEED).returncode == 0
        yield ns
    finally:
        ns.remove()


@pytest.mark.root
@_bounded(max_examples=30, deadline_ms=30000)
@given(invocations(exclude=("dry_run", "run_validation", "network_namespace")), st.booleans())
def test_real_apply_exits_0_or_2_and_a_refusal_changes_nothing(
        seeded: Namespace, case: tuple[list[str], dict[str, str], dict], via_flag: bool) -> None:
    argv, env, _ = case
    if via_flag:  # the namespace named by --network-namespace: the same one, entered by setns
        argv = [*argv, "--network-namespace", seeded.name]
    before = snapshot(seeded)
    result = istio_init(seeded, *argv, env=env)
    event(f"exit {result.returncode}")
    assert "Traceback" not in result.stderr and "unexpected error" not in result.stderr, result.stderr[-2000:]
    assert result.returncode in (0, 2), (result.returncode, result.stderr[-2000:])
    if result.returncode == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        _named_spec(lines[0], argv, env)
        assert snapshot(seeded) == before
    else:
        assert b":ISTIO_" in b"".join(snapshot(seeded)[:4]) or "--skip-rule-apply" in argv \
            or env.get("SKIP_RULE_APPLY", "").strip().lower() in ("1", "true", "yes", "on")
        reseeded = istio_init(seeded, *SEED)  # the next example starts from the seed rules again
        assert reseeded.returncode == 0, reseeded.stderr[-2000:]


# ---- the kernel's own rule for device names -------------------------------------------------


@pytest.mark.root
@_bounded(max_examples=50, deadline_ms=2000)
@given(st.one_of(_IFNAME, st.text(min_size=1, max_size=16)).filter(_passable))
def test_kernel_refusal_is_the_kernels_rule(module_netns: Namespace, name: str) -> None:
    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    assume("\x00" not in name and "\udcff" not in name and name not in ("lo", "hypeer"))
    with NetNS(module_netns.name) as ipr:
        try:
            ipr.link("add", ifname=name, kind="veth", peer="hypeer")
            taken = True
        except NetlinkError:
            taken = False
        event(f"kernel takes it: {taken}")
        if taken:
            ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
    assert taken == (ifnames.kernel_refusal(name) is None), name.encode("utf-8", "surrogateescape")
