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
from pathlib import Path
from typing import Iterator

import pytest

from podnet import APP_UID, POD_V4, PROXY_UID, Pod, Server, nsenter
from trafficpaths_current import (CONFIGS, HERE, HOLD_PORT, PATHS, RESOLVER, Path_, config_env, connect, every_pod,
                                  outcome, write_resolv_conf)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def resolv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_resolv_conf(tmp_path_factory.mktemp("pod"))


@pytest.fixture(scope="module")
def pods(resolv: Path) -> Iterator[dict[str, Pod]]:
    yield from every_pod(resolv)


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
                          env=config_env(path.config, resolv))
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
    assert outcome(answer) == path.expect, answer
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
        assert outcome(answer) == path.broken, answer
        _assert_trace_agrees(_trace(pod, path, resolv, live=True), path.broken)
    finally:
        subprocess.run([*nsenter(pod.name), "iptables-legacy-restore"], input=saved, text=True, check=True,
                       capture_output=True, timeout=30)


def _probe_invalid(pod: Pod) -> int:
    """ACKs the pod sent back for one out-of-window segment on a live connection (see invalidseg.py)."""
    holder = subprocess.Popen([*nsenter(pod.name), sys.executable, str(HERE / "invalidseg.py"), "hold",
                               "--port", str(HOLD_PORT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        done = subprocess.run([*nsenter(pod.peer), sys.executable, str(HERE / "invalidseg.py"), "probe",
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
        subprocess.run([*nsenter(pod.name), "iptables-legacy-restore"], input=saved, text=True, check=True,
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
    process = subprocess.Popen([*nsenter(pod.name), sys.executable, "-c", AGENT_DNS], stdout=subprocess.PIPE,
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
    done = subprocess.run([*nsenter(pods["dns"].name), sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["from"] == [RESOLVER, 53]
    assert seen["answer"] == {"tag": "agent-dns", "listener": 15053, "uid": PROXY_UID}
