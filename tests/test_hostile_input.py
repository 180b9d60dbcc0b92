"""Issue 12's reproducers of hostile input (findings 1, 2, 3, 5 and 7), as regressions.

Each case once crashed with "unexpected error: ValueError" (exit 1), was
silently accepted as something else, or installed a rule istio-init could not
find again. Now each is one stderr line naming the flag (and the variable
when the value came from one), exit 2, and nothing changed; or, where a
backend can carry the value exactly, the exact rule.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from clirun import clean_environ, invoke
from hostile import SEED, istio_init, one_line_naming, pod_namespace, snapshot
from istio_init import ifnames
from istio_init.config import FLAGS_BY_DEST
from nsutil import Namespace

# Every flag that takes ports or ids, with its variable (finding 1's 20 cases).
NUMERIC_DESTS = ("envoy_port", "inbound_capture_port", "inbound_tunnel_port", "proxy_uid", "proxy_gid",
                 "inbound_ports", "local_exclude_ports", "outbound_ports", "outbound_ports_exclude",
                 "iptables_probe_port")
OTHER_NUMBERS = ("tproxy_mark", "tproxy_route_table")


def _refused(argv: list[str], env: dict[str, str], label: str) -> str:
    result = invoke(["istio-iptables", "-n", *argv], env)
    assert result.code == 2, (result.code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("istio-init: invalid value for ") and label in lines[0], lines[0]
    assert "unexpected error" not in result.stderr and result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("dest", NUMERIC_DESTS + OTHER_NUMBERS)
@pytest.mark.parametrize("where", ["flag", "variable"])
@pytest.mark.parametrize("digits", ["²", "１５００１", "١٣٣٧", "1_000", "1" * 5000])
def test_numbers_are_ascii_digits_within_bounds(dest: str, where: str, digits: str) -> None:
    spec = FLAGS_BY_DEST[dest]
    if where == "flag":
        argv, env, label = [f"--{spec.long}", digits], {}, spec.label
    else:
        argv, env, label = [], {spec.env: digits}, f"{spec.label} (from {spec.env})"
    line = _refused(argv, env, label)
    assert len(line) < 300  # a 5,000-digit value is shown shortened


@pytest.mark.parametrize("text", ["1" * 5000, "9" * 400 + "s", "1" * 30 + "h", "3601s", "61m", "inf", "nan",
                                  "１s", "5٫0s"])
def test_probe_timeout_is_bounded(text: str) -> None:
    _refused(["--probe-timeout", text], {}, "--probe-timeout")
    _refused([], {"PROBE_TIMEOUT": text}, "--probe-timeout (from PROBE_TIMEOUT)")


@pytest.mark.parametrize("text,seconds", [("3600s", 3600.0), ("1h", 3600.0), ("2µs", 2e-6), ("2μs", 2e-6),
                                          ("0000000005s", 5.0)])
def test_probe_timeout_within_bounds_is_accepted(text: str, seconds: float) -> None:
    result = invoke(["-n", "--probe-timeout", text])
    assert result.code == 0, result.stderr
    assert f"probe_timeout: {seconds}" in result.stderr


@pytest.mark.parametrize("name,reason", [
    ("ДОБРО", "kernel"),          # Р is D0 A0, and the kernel calls 0xA0 a space
    ("à", "kernel"),
    ("ééééééééx", "kernel"),      # 17 bytes
    ("-j", "iptables option"),
    ("-", "iptables option"),
    ("--help", "iptables option"),
    ("a\u2003b", "splits or hides"),  # the kernel takes it; reconcile's reading did not
    ("a\u0085", "splits or hides"),
    ("a\u200bb", "splits or hides"),
])
def test_interface_names_no_backend_can_carry_are_refused(name: str, reason: str) -> None:
    for backend in ("auto", "libiptc", "legacy", "nft"):
        line = _refused(["-k", f"eth1,{name}", "--iptables-backend", backend], {}, "-k/--kube-virt-interfaces")
        assert reason in line


def test_non_ascii_interface_names_are_refused_for_libiptc_naming_the_backend() -> None:
    line = _refused(["-k", "éééééééx", "--iptables-backend", "libiptc"], {}, "-k/--kube-virt-interfaces")
    assert "--iptables-backend libiptc" in line
    line = _refused([], {"KUBE_VIRT_INTERFACES": "é", "ISTIO_IPTABLES_BACKEND": "libiptc"},
                    "-k/--kube-virt-interfaces (from KUBE_VIRT_INTERFACES)")
    assert "libiptc" in line


def test_invalid_network_namespace_variable_is_named() -> None:
    result = invoke(["-n"], {"NETWORK_NAMESPACE": "istio-init-no-such-namespace"})
    assert result.code == 2, result.stderr
    assert result.stderr.splitlines() == [
        "istio-init: invalid value for --network-namespace (from NETWORK_NAMESPACE): "
        "'/run/netns/istio-init-no-such-namespace': No such file or directory"]
    result = invoke(["-n"], {"NETWORK_NAMESPACE": "/etc/hostname"})
    assert result.code == 2 and "(from NETWORK_NAMESPACE)" in result.stderr
    assert "not a network namespace" in result.stderr


def test_invalid_network_namespace_flag_is_named() -> None:
    result = invoke(["-n", "--network-namespace", "/proc/self/ns/no-such"])
    assert result.code == 2
    assert result.stderr.startswith("istio-init: invalid value for --network-namespace: ")


# ---- in a namespace: what the kernel and each backend really do -------------------------


def _kernel_takes(ns: Namespace, name: str, index: int) -> bool:
    from pyroute2 import NetNS
    from pyroute2.netlink.exceptions import NetlinkError

    with NetNS(ns.name) as ipr:
        try:
            ipr.link("add", ifname=name, kind="veth", peer=f"peer{index}")
        except NetlinkError:
            return False
        return True


KERNEL_NAMES = ["eth1", "é", "à", "ДОБРО", "ДОБО", "a\u00a0b", "a\u2003b", "a\u0085", "éééééééx",
                "ééééééééx", "abcdefghijklmno", "abcdefghijklmnop", ".", "..", "a:b", "a/b", "-j", "eth+", "✓"]


@pytest.mark.root
def test_kernel_refusal_agrees_with_the_kernel(netns: Namespace) -> None:
    for index, name in enumerate(KERNEL_NAMES):
        assert _kernel_takes(netns, name, index) == (ifnames.kernel_refusal(name) is None), name


@pytest.mark.root
@pytest.mark.parametrize("backend", ["auto", "legacy", "nft", "libiptc"])
@pytest.mark.parametrize("name", ["éééééééx", "✓", "vnet+", "abcdefghijklmno", "a%b=c*"])
def test_accepted_interface_names_are_written_exactly(backend: str, name: str) -> None:
    """Every name the validation lets through is in the rules byte for byte, and clean removes it."""
    ns = pod_namespace()
    try:
        before = snapshot(ns)
        result = istio_init(ns, *SEED, "-k", name, "--iptables-backend", backend)
        if backend == "libiptc" and not name.isascii():
            one_line_naming(result, "-k/--kube-virt-interfaces")
            assert snapshot(ns) == before
            return
        assert result.returncode == 0, result.stderr
        tool = "iptables-nft-save" if backend == "nft" else "iptables-legacy-save"
        saved = subprocess.run(["nsenter", f"--net={ns.path}", tool], capture_output=True, check=True).stdout
        prerouting = [line for line in saved.splitlines() if line.startswith(b"-A PREROUTING -i ")]
        wanted = b"-A PREROUTING -i " + name.encode()
        assert prerouting == [wanted + b" -j ISTIO_REDIRECT", wanted + b" -j RETURN"], prerouting
        again = istio_init(ns, *SEED, "-k", name, "--iptables-backend", backend)
        assert again.returncode == 0, again.stderr
        saved_again = subprocess.run(["nsenter", f"--net={ns.path}", tool], capture_output=True, check=True).stdout
        assert [line for line in saved_again.splitlines() if b" -i " in line] == prerouting
        cleaned = istio_init(ns, "clean", "--iptables-backend", "nft" if backend == "nft" else "legacy")
        assert cleaned.returncode == 0, cleaned.stderr
        saved = subprocess.run(["nsenter", f"--net={ns.path}", tool], capture_output=True, check=True).stdout
        assert b"ISTIO" not in saved and b" -i " not in saved
    finally:
        ns.remove()


@pytest.mark.root
@pytest.mark.parametrize("argv", [
    ["-k", "éééééééx", "--iptables-backend", "libiptc"],   # finding 2
    ["-k", "ДОБРО"],                                       # finding 2
    ["-k", "-j"],                                          # finding 3
    ["-p", "²"], ["-u", "١٣٣٧"], ["-t", "1_000", "-m", "TPROXY"], ["-p", "1" * 5000],  # finding 1
    ["--probe-timeout", "9" * 400 + "s", "--run-validation"],                         # finding 5
    ["--network-namespace", "istio-init-no-such-namespace"],                          # finding 7
], ids=lambda argv: " ".join(a[:12] for a in argv))
def test_refusals_leave_a_seeded_namespace_as_it_was(argv: list[str]) -> None:
    ns = pod_namespace()
    try:
        seeded = istio_init(ns, *SEED)
        assert seeded.returncode == 0, seeded.stderr
        before = snapshot(ns)
        result = istio_init(ns, *SEED, *argv)
        one_line_naming(result, FLAGS_BY_DEST[_dest_of(argv[0])].label)
        assert snapshot(ns) == before
        # and the namespace still converges and cleans up (finding 3's "clean fails")
        assert istio_init(ns, *SEED).returncode == 0
        assert snapshot(ns) == before
        assert istio_init(ns, "clean").returncode == 0
    finally:
        ns.remove()


@pytest.mark.root
def test_finding_2_names_are_exact_with_auto() -> None:
    """`-k éééééééx` with auto: the restore tool writes it (python-iptables cut it to `éééé\\xc3+`)."""
    ns = pod_namespace()
    try:
        result = istio_init(ns, *SEED, "-k", "éééééééx")
        assert result.returncode == 0, result.stderr
        assert "iptables backend legacy (auto:" in result.stderr  # auto never takes libiptc (README, "Start-up time")
        saved = subprocess.run(["nsenter", f"--net={ns.path}", "iptables-legacy-save"], capture_output=True,
                               check=True).stdout
        assert b"-A PREROUTING -i \xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9x -j RETURN" in saved
        assert istio_init(ns, "clean").returncode == 0
    finally:
        ns.remove()


def _dest_of(flag: str) -> str:
    for dest, spec in FLAGS_BY_DEST.items():
        if flag in (f"-{spec.short}", f"--{spec.long}"):
            return dest
    raise KeyError(flag)


@pytest.mark.root
@pytest.mark.parametrize("backend", ["libiptc", "legacy", "nft"])
def test_a_namespace_left_with_non_utf8_names_converges_and_cleans(backend: str) -> None:
    """The state finding 2 left (`-i éééé\\xc3+`, half a UTF-8 sequence) no longer blocks every later run.

    iptables-save's text is carried byte for byte (surrogateescape): our broken rule is
    removed, someone else's rule with a non-UTF-8 name stays exactly, whatever the locale.
    """
    flavour = "nft" if backend == "nft" else "legacy"
    left = (b"*nat\n:ISTIO_REDIRECT - [0:0]\n-A PREROUTING -i \xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3+ -j ISTIO_REDIRECT\n"
            b"-A POSTROUTING -o \xff -j MASQUERADE\nCOMMIT\n")
    foreign = b"-A POSTROUTING -o \xff -j MASQUERADE"
    ns = pod_namespace()
    try:
        subprocess.run(["nsenter", f"--net={ns.path}", f"iptables-{flavour}-restore", "--noflush"], input=left,
                       check=True, capture_output=True)
        env = {**clean_environ(), "PYTHONIOENCODING": "utf-8:strict"}
        for argv in (SEED, SEED, ("clean",)):
            done = subprocess.run(["nsenter", f"--net={ns.path}", sys.executable, "-m", "istio_init", *argv,
                                   "--iptables-backend", backend], capture_output=True, env=env, timeout=60)
            assert done.returncode == 0, done.stderr.decode(errors="replace")
            saved = subprocess.run(["nsenter", f"--net={ns.path}", f"iptables-{flavour}-save"], capture_output=True,
                                   check=True).stdout
            assert b"\xc3+" not in saved and foreign in saved.splitlines()
        assert b"ISTIO" not in saved
    finally:
        ns.remove()
