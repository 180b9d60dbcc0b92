"""Real sockets through the current rule set: what it adds to 1.8's capture, proven on the wire.

Same harness as test_traffic.py (tests/podnet.py: a pod namespace and a peer
joined by a veth pair, a stand-in proxy as uid 1337 on 15001/15006/15053, an
app as uid 1000, a peer listener on 53/8080/...). Each path is checked twice:
the connection lands where docs/rules-current.md says, and with the deciding rule
deleted (or rewritten) it lands somewhere else, so the test fails when that
rule is missing or wrong. `istio-init trace`, from the plan for the same flags
and from the pod's live rules, must predict the outcome the sockets saw. The
pod's resolv.conf is a file the test writes (ISTIO_INIT_RESOLV_CONF); its
nameserver is a peer address.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from clirun import clean_environ
from podnet import APP_UID, OTHER_UID, PEER_SERVICE_V4, PEER_V4, POD_V4, PROXY_UID, Answer, Pod, Server, _nsenter

pytestmark = pytest.mark.root

RESOLVER = PEER_SERVICE_V4  # the pod's nameserver: a peer address
EXCLUDED_GROUP = 3000
HOLD_PORT = 7100
HERE = Path(__file__).resolve().parent

CONFIGS = {
    # REDIRECT, DNS capture to the resolv.conf resolver, one excluded owner group, default loopback CIDR.
    "dns": (("-u", "1337", "-b", "*", "-d", "9000", "-i", "*", "--redirect-dns"),
            {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": str(EXCLUDED_GROUP)}),
    "capture_all": (("-u", "1337", "-i", "*", "--redirect-dns", "--capture-all-dns"), {}),
    "exclude_nic": (("-u", "1337", "-b", "*", "-i", "*", "-c", "eth0"), {}),
    # -o 53 excludes DNS over UDP too; the IPv4 loopback CIDR is all of 127.0.0.0/8.
    "udp_exclude_loopback": (("-u", "1337", "-b", "*", "-i", "*", "--redirect-dns", "-o", "53"),
                             {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/8"}),
    "drop_invalid": (("-u", "1337", "-b", "8080", "-i", "*", "--drop-invalid"), {}),
}


@dataclass(frozen=True)
class Breakage:
    """Rules ("TABLE CHAIN SPEC", as iptables-save spells them) to delete, or to replace in place."""

    delete: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Path_:
    name: str
    config: str
    direction: str
    dst: str
    port: int
    expect: tuple[str, int]
    broken: tuple[str, int]
    breakage: Breakage
    uid: int = APP_UID
    gid: int | None = None
    proto: str = "tcp"


def _nat(*rules: str) -> Breakage:
    return Breakage(delete=tuple(f"nat {rule}" for rule in rules))


DNS_UDP_RULE = f"ISTIO_OUTPUT_DNS -d {RESOLVER}/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"
DNS_TCP_RULE = f"ISTIO_OUTPUT_DNS -d {RESOLVER}/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053"
PROXY_LO_RULES = [f"ISTIO_OUTPUT ! -d {{loop}} -o lo -p tcp {{port}} -m owner --{kind}-owner 1337 -j ISTIO_IN_REDIRECT"
                  for kind in ("uid", "gid")]


def _proxy_lo(loop: str, dns: bool) -> list[str]:
    return [rule.format(loop=loop, port="-m multiport ! --dports 53,15008" if dns and "uid" in rule
                        else "-m tcp ! --dport 15008") for rule in PROXY_LO_RULES]


PATHS = (
    Path_("dns_udp_to_resolver_reaches_agent_and_answer_returns", "dns", "out", RESOLVER, 53, ("proxy", 15053),
          ("peer", 53), _nat(DNS_UDP_RULE), proto="udp"),
    Path_("dns_tcp_to_resolver_reaches_agent", "dns", "out", RESOLVER, 53, ("proxy", 15053), ("proxy", 15001),
          _nat(DNS_TCP_RULE)),
    Path_("dns_udp_to_other_server_not_captured", "dns", "out", PEER_V4, 53, ("peer", 53), ("proxy", 15053),
          Breakage(replace=((f"nat {DNS_UDP_RULE}", DNS_UDP_RULE.replace(f"-d {RESOLVER}/32 ", ""),),)),
          proto="udp"),
    Path_("proxy_dns_query_goes_upstream", "dns", "out", RESOLVER, 53, ("peer", 53), ("proxy", 15053),
          _nat("ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN", "ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN"),
          uid=PROXY_UID, gid=PROXY_UID, proto="udp"),
    Path_("excluded_owner_group_not_captured", "dns", "out", PEER_SERVICE_V4, 8080, ("peer", 8080),
          ("proxy", 15001), _nat(f"ISTIO_OUTPUT -m owner --gid-owner {EXCLUDED_GROUP} -j RETURN"),
          uid=OTHER_UID, gid=EXCLUDED_GROUP),
    Path_("other_group_captured", "dns", "out", PEER_SERVICE_V4, 8080, ("proxy", 15001), ("peer", 8080),
          _nat("ISTIO_OUTPUT -j ISTIO_REDIRECT"), uid=OTHER_UID, gid=OTHER_UID),
    Path_("proxy_to_127_0_0_5_goes_inbound_with_loopback_32", "dns", "out", "127.0.0.5", 8080, ("proxy", 15006),
          ("app", 8080), _nat(*_proxy_lo("127.0.0.1/32", dns=True)), uid=PROXY_UID, gid=PROXY_UID),
    Path_("capture_all_dns_udp_to_any_server", "capture_all", "out", PEER_V4, 53, ("proxy", 15053), ("peer", 53),
          _nat("ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053"), proto="udp"),
    Path_("capture_all_dns_tcp_to_any_server", "capture_all", "out", PEER_V4, 53, ("proxy", 15053),
          ("proxy", 15001), _nat("ISTIO_OUTPUT_DNS -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053")),
    Path_("inbound_on_excluded_interface_not_captured", "exclude_nic", "in", POD_V4, 8080, ("app", 8080),
          ("proxy", 15006), _nat("PREROUTING -i eth0 -j RETURN")),
    Path_("outbound_on_excluded_interface_not_captured", "exclude_nic", "out", PEER_SERVICE_V4, 8080,
          ("peer", 8080), ("proxy", 15001), _nat("OUTPUT -o eth0 -j RETURN")),
    Path_("excluded_udp_port_not_captured", "udp_exclude_loopback", "out", RESOLVER, 53, ("peer", 53),
          ("proxy", 15053), _nat("ISTIO_OUTPUT -p udp -m udp --dport 53 -j RETURN"), proto="udp"),
    Path_("excluded_tcp_port_not_captured", "udp_exclude_loopback", "out", RESOLVER, 53, ("peer", 53),
          ("proxy", 15053), _nat("ISTIO_OUTPUT -p tcp -m tcp --dport 53 -j RETURN")),
    Path_("proxy_to_127_0_0_5_stays_local_with_loopback_8", "udp_exclude_loopback", "out", "127.0.0.5", 8080,
          ("app", 8080), ("proxy", 15006),
          Breakage(replace=tuple((f"nat {old}", new) for old, new in
                                 zip(_proxy_lo("127.0.0.0/8", dns=True), _proxy_lo("127.0.0.1/32", dns=True)))),
          uid=PROXY_UID, gid=PROXY_UID),
)


def _config_env(name: str, resolv: Path) -> dict[str, str]:
    return clean_environ({**CONFIGS[name][1], "ISTIO_INIT_RESOLV_CONF": str(resolv)})


LEGACY = ("--rules-version", "current", "--iptables-backend", "legacy")


def up(name: str, resolv: Path, flags: tuple[str, ...] = LEGACY, tag: str = "cur") -> Pod:
    """The pod of config `name`, its rules applied by istio-init with `flags`, listeners started."""
    args = CONFIGS[name][0]
    pod = Pod.up(args, ipv6=False, listeners=False, tag=f"{tag}-{name}", apply=False)
    try:
        argv = [sys.executable, "-m", "istio_init", *flags, *args, "--ipv6", "false",
                "--network-namespace", f"/run/netns/{pod.name}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                              env=_config_env(name, resolv))
        if done.returncode != 0:
            raise RuntimeError(f"istio-init apply failed: {done.stderr.strip()}")
        pod.start_listeners()
    except BaseException:
        pod.down()
        raise
    return pod


def write_resolv_conf(directory: Path) -> Path:
    """The pods' resolv.conf: one nameserver, a peer address."""
    conf = directory / "resolv.conf"
    conf.write_text(f"search svc.cluster.local\nnameserver {RESOLVER}\noptions ndots:5\n")
    return conf


def every_pod(resolv: Path, flags: tuple[str, ...] = LEGACY, tag: str = "cur") -> Iterator[dict[str, Pod]]:
    """One pod per config (the module fixtures' body), all taken down at the end."""
    made: dict[str, Pod] = {}
    try:
        for name in CONFIGS:
            made[name] = up(name, resolv, flags, tag)
        yield made
    finally:
        for pod in made.values():
            pod.down()


@pytest.fixture(scope="module")
def resolv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_resolv_conf(tmp_path_factory.mktemp("pod"))


@pytest.fixture(scope="module")
def pods(resolv: Path) -> Iterator[dict[str, Pod]]:
    yield from every_pod(resolv)


def connect(pod: Pod, path: Path_) -> Answer:
    if path.direction == "in":
        return pod.inbound(path.dst, path.port, proto=path.proto)
    return pod.outbound(path.dst, path.port, uid=path.uid, gid=path.gid, proto=path.proto)


def _outcome(answer: Answer) -> tuple[str | None, int | None]:
    assert answer.error is None, answer.error
    return answer.tag, answer.listener


def _trace(pod: Pod, path: Path_, resolv: Path, live: bool) -> dict:
    """`istio-init trace` for the path: from the plan (same flags, environment, resolv.conf) or --live."""
    gid = path.uid if path.gid is None else path.gid
    argv = [sys.executable, "-m", "istio_init", "trace", "--rules-version", "current", *CONFIGS[path.config][0],
            "--ipv6", "false", "--direction", path.direction, "--dst", path.dst, "--dport", str(path.port),
            "--protocol", path.proto, "--uid", str(path.uid), "--gid", str(gid), "--json"]
    if path.dst.startswith("127."):
        argv += ["--out-interface", "lo"]
    if live:
        argv += ["--live", "--iptables-backend", "legacy", "--network-namespace", f"/run/netns/{pod.name}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          env=_config_env(path.config, resolv))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _assert_trace_agrees(trace: dict, outcome: tuple[str | None, int | None]) -> None:
    if outcome[0] == "proxy":
        assert trace["captured"] and trace["to_port"] == outcome[1], trace["outcome"]
    else:
        assert not trace["captured"], trace["outcome"]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_path(pods: dict[str, Pod], resolv: Path, path: Path_) -> None:
    pod = pods[path.config]
    answer = connect(pod, path)
    assert _outcome(answer) == path.expect, answer
    if path.expect == ("proxy", 15053) and path.proto == "udp":
        assert answer.raw["uid"] == PROXY_UID  # the agent's socket answered, and its reply came back
    _assert_trace_agrees(_trace(pod, path, resolv, live=False), path.expect)
    _assert_trace_agrees(_trace(pod, path, resolv, live=True), path.expect)


def _rule_number(saved: str, table: str, chain: str, spec: str) -> int:
    block = saved[saved.index(f"*{table}\n"):]
    block = block[:block.index("COMMIT\n")]
    rules = [line for line in block.splitlines() if line.startswith(f"-A {chain} ")]
    return rules.index(f"-A {chain} {spec}") + 1


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.name)
def test_path_breaks_without_its_rule(pods: dict[str, Pod], resolv: Path, path: Path_) -> None:
    pod = pods[path.config]
    saved = pod.save()
    try:
        for rule in path.breakage.delete:
            table, chain, spec = rule.split(" ", 2)
            assert f"-A {chain} {spec}\n" in saved, f"rule not installed: {rule}"
            pod.iptables("-t", table, "-D", chain, *shlex.split(spec))
        for old, new in path.breakage.replace:
            table, chain, spec = old.split(" ", 2)
            number = _rule_number(saved, table, chain, spec)
            pod.iptables("-t", table, "-R", chain, str(number), *shlex.split(new.split(" ", 1)[1]))
        answer = connect(pod, path)
        assert _outcome(answer) == path.broken, answer
        _assert_trace_agrees(_trace(pod, path, resolv, live=True), path.broken)
    finally:
        subprocess.run([*_nsenter(pod.name), "iptables-legacy-restore"], input=saved, text=True, check=True,
                       capture_output=True, timeout=30)


def _probe_invalid(pod: Pod) -> int:
    """ACKs the pod sent back for one out-of-window segment on a live connection (see invalidseg.py)."""
    holder = subprocess.Popen([*_nsenter(pod.name), sys.executable, str(HERE / "invalidseg.py"), "hold",
                               "--port", str(HOLD_PORT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        done = subprocess.run([*_nsenter(pod.peer), sys.executable, str(HERE / "invalidseg.py"), "probe",
                               "--dst", POD_V4, "--port", str(HOLD_PORT)],
                              capture_output=True, text=True, timeout=30, check=True)
        result = json.loads(done.stdout)
        assert "error" not in result, result
        return result["acks"]
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()  # type: ignore[union-attr]


def test_drop_invalid_drops_an_out_of_window_segment(pods: dict[str, Pod]) -> None:
    pod = pods["drop_invalid"]
    assert _probe_invalid(pod) == 0  # conntrack INVALID -> mangle ISTIO_DROP -> dropped before TCP
    saved = pod.save()
    rule = "-m conntrack --ctstate INVALID -j ISTIO_DROP"
    assert f"-A PREROUTING {rule}" in saved
    try:
        pod.iptables("-t", "mangle", "-D", "PREROUTING", *shlex.split(rule))
        assert _probe_invalid(pod) >= 1  # without the rule the pod's TCP answers it with an ACK
    finally:
        subprocess.run([*_nsenter(pod.name), "iptables-legacy-restore"], input=saved, text=True, check=True,
                       capture_output=True, timeout=30)


# A stand-in for istio-agent's DNS server: like the real one it listens on 127.0.0.1:15053, so its
# replies leave from the address the REDIRECT sent the query to and conntrack can undo the NAT.
# The socket is made after dropping to uid 1337: owner matches see the socket's creator.
AGENT_DNS = (f"import json,os,socket,time;os.setgroups([]);os.setgid({PROXY_UID});os.setuid({PROXY_UID});"
             "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
             "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('127.0.0.1',15053));"
             "s.settimeout(1);print('ready',flush=True)\n"
             "end=time.monotonic()+600\n"
             "while time.monotonic()<end:\n"
             " try: d,a=s.recvfrom(2048)\n"
             " except OSError: continue\n"
             " s.sendto(json.dumps({'tag':'agent-dns','listener':15053,'uid':os.getuid()}).encode(),a)\n")


@pytest.fixture
def agent_dns(pods: dict[str, Pod]) -> Iterator[None]:
    pod = pods["dns"]
    process = subprocess.Popen([*_nsenter(pod.name), sys.executable, "-c", AGENT_DNS], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    server = Server(pod.name, process)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        yield
    finally:
        server.stop()


def test_dns_answer_comes_back_from_the_resolvers_address(pods: dict[str, Pod], agent_dns: None) -> None:
    """A connected UDP socket accepts only replies from the address it sent to: the reverse NAT works
    (the app's query and the agent's answer share conntrack zone 2)."""
    script = (f"import os,socket,json;os.setgroups([]);os.setgid({APP_UID});os.setuid({APP_UID});"
              "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3);"
              f"s.connect(({RESOLVER!r},53));s.send(b'q');d,a=s.recvfrom(4096);"
              "print(json.dumps({'from':list(a),'answer':json.loads(d)}))")
    done = subprocess.run([*_nsenter(pods["dns"].name), sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["from"] == [RESOLVER, 53]
    assert seen["answer"] == {"tag": "agent-dns", "listener": 15053, "uid": PROXY_UID}
