"""istio-init-cni chained after the real reference plugins, as a container runtime runs it (root only).

Every test builds a node namespace and pod namespaces (tests/cninode.py): the
reference `bridge` plugin with `host-local` IPAM wires the pod, and its result
is istio-init-cni's prevResult. The rules the plugin leaves are compared with
the goldens of tests/cases.py, traffic through the bridge is checked with the
podnet listeners, and the protocol (result, error object, exit status) with
what the runtime would read on stdout.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from cases import CASES, SEED_ARGS
from cninode import GATEWAY_V4, PLUGIN, CniPod, Node, reference_plugins_missing, wait
from istio_init.render import split_families
from istio_init.backends.iptables.savefile import normalize
from nsutil import Namespace
from podnet import APP_UID, PROXY_UID, run_client, start_server
from appliedns import exact, routing

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(reference_plugins_missing() is not None,
                                 reason=reference_plugins_missing() or "")]

CASE = {case.name: case for case in CASES}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node.create(tmp_path)
    try:
        yield node
    finally:
        node.remove()


def golden(name: str) -> tuple[dict, dict]:
    v4, v6 = split_families(CASE[name].golden.read_text())
    return normalize(v4), normalize(v6)


def rules(pod: CniPod) -> tuple[dict, dict]:
    return normalize(pod.save(4)), normalize(pod.save(6))


def state(pod: CniPod) -> tuple[str, str, dict]:
    """Both families' tables and the pod's routing, for "nothing changed" comparisons."""
    return exact(pod.save(4)), exact(pod.save(6)), routing(Namespace(pod.name))


def only_one_answer(stdout: str) -> object:
    """stdout is the protocol's: exactly one JSON document, nothing else."""
    decoded, end = json.JSONDecoder().raw_decode(stdout)
    assert stdout[end:].strip() == "", stdout
    return decoded


# ---- ADD: the golden rules, the result unchanged ---------------------------------------------

@pytest.mark.parametrize("name", ["seed", "tproxy_wildcard", "ipv6_seed", "dns_capture_env"])
def test_add_leaves_the_golden_rules_and_prints_the_bridge_result(node: Node, name: str) -> None:
    case = CASE[name]
    # ipv6_seed's pod gets only an IPv6 address from the bridge: the family is detected, not pinned.
    pod = node.add_pod(name.replace("_", ""), ipv6=case.ipv6)
    done = node.istio("ADD", pod, list(case.args), extra={"env": case.env} if case.env else {})
    assert done.code == 0, (done.stdout, done.stderr)
    assert only_one_answer(done.stdout) == pod.result
    assert rules(pod) == golden(name)
    log = (node.state_dir / "istio-init-cni.log").read_text()
    assert "capture installed" in log and "iptables backend" in log  # the apply's output went to the log
    live = routing(Namespace(pod.name))
    if "TPROXY" in case.args:
        assert any(("FRA_FWMARK", "1337") in rule and ("FRA_TABLE", "133") in rule for rule in live["rules"])
    assert any(("IFA_ADDRESS", "::6") in address for address in live["addresses"]) == case.ipv6


def test_rules_version_selects_the_rule_set_as_the_flag_does(node: Node) -> None:
    """"rulesVersion" is --rules-version: ADD leaves what the dry run of the flag prints; CHECK agrees."""
    from clirun import invoke

    pod = node.add_pod("current")
    dry = invoke([*SEED_ARGS, "--rules-version", "current", "-n", "--ipv6", "false"])
    assert dry.code == 0, dry.stderr
    done = node.istio("ADD", pod, SEED_ARGS, extra={"rulesVersion": "current"})
    assert done.code == 0, done.stdout
    assert rules(pod) == (normalize(split_families(dry.stdout)[0]), {})
    assert rules(pod) != golden("seed")  # the current rule set differs from 1.8's for these flags
    assert node.istio("CHECK", pod, SEED_ARGS, extra={"rulesVersion": "current"}).code == 0
    assert node.istio("CHECK", pod, SEED_ARGS).code != 0  # against 1.8's plan, the current rules are drift
    bad = node.istio("ADD", pod, SEED_ARGS, extra={"rulesVersion": "0.9"})
    assert bad.code != 0 and "--rules-version" in only_one_answer(bad.stdout)["msg"]


def test_native_nftables_is_the_flag(node: Node) -> None:
    """"nativeNftables": true is --native-nftables: the dry run's tables; CHECK reads them; DEL removes them."""
    from nftsandbox import istio_init, listing, load, run_in

    scratch = Namespace.create()
    try:
        load(scratch, istio_init(scratch, *SEED_ARGS, "--native-nftables", "--ipv6", "false", "-n").stdout)
        want = listing(scratch)
    finally:
        scratch.remove()
    pod = node.add_pod("nft")
    done = node.istio("ADD", pod, SEED_ARGS, extra={"nativeNftables": True})
    assert done.code == 0, done.stdout
    assert listing(Namespace(pod.name)) == want and "table inet istio-proxy-nat" in want
    assert "ISTIO" not in pod.save(4)
    assert node.istio("CHECK", pod, SEED_ARGS, extra={"nativeNftables": True}).code == 0
    run_in(Namespace(pod.name), ["nft", "flush", "chain", "inet", "istio-proxy-nat", "istio-output"])
    drifted = node.istio("CHECK", pod, SEED_ARGS, extra={"nativeNftables": True})
    assert drifted.code != 0 and only_one_answer(drifted.stdout)["code"] == 101
    assert node.istio("DEL", pod, SEED_ARGS, extra={"nativeNftables": True}).code == 0
    assert "istio" not in listing(Namespace(pod.name))


def test_add_twice_leaves_one_rule_set(node: Node) -> None:
    pod = node.add_pod("twice")
    assert node.istio("ADD", pod, SEED_ARGS).code == 0
    once = state(pod)
    again = node.istio("ADD", pod, SEED_ARGS)
    assert again.code == 0, again.stdout
    assert state(pod) == once
    assert rules(pod) == golden("seed")


# ---- traffic through the bridge ----------------------------------------------------------------

def test_capture_inbound_and_outbound_through_the_bridge(node: Node) -> None:
    pod = node.add_pod("wire")
    assert node.istio("ADD", pod, SEED_ARGS).code == 0
    servers = [start_server(pod.name, "proxy", tcp=(15001, 15006), uid=PROXY_UID, gid=PROXY_UID),
               start_server(pod.name, "app", tcp=(8080,), uid=APP_UID, gid=APP_UID),
               start_server(node.name, "peer", tcp=(8080,))]
    try:
        # Inbound: the node (the rest of the cluster, behind cni0) calls the app; the proxy gets it.
        inbound = run_client(node.name, pod.address, 8080)
        assert (inbound.tag, inbound.listener, inbound.orig) == ("proxy", 15006, (pod.address, 8080))
        # Outbound: the app calls the peer on the node; the proxy gets it, with the original destination.
        outbound = run_client(pod.name, GATEWAY_V4, 8080, uid=APP_UID, gid=APP_UID)
        assert (outbound.tag, outbound.listener, outbound.orig) == ("proxy", 15001, (GATEWAY_V4, 8080))
        # The proxy's own connection goes out: the bridge carries it to the real peer.
        direct = run_client(pod.name, GATEWAY_V4, 8080, uid=PROXY_UID, gid=PROXY_UID)
        assert direct.tag == "peer", direct
        # After DEL the same connections reach the app and the peer themselves.
        assert node.istio("DEL", pod).code == 0
        assert run_client(node.name, pod.address, 8080).tag == "app"
        assert run_client(pod.name, GATEWAY_V4, 8080, uid=APP_UID, gid=APP_UID).tag == "peer"
    finally:
        for server in servers:
            server.stop()


# ---- DEL -----------------------------------------------------------------------------------------

def test_del_removes_rules_routes_and_the_ipv6_address_and_succeeds_once_the_namespace_is_gone(
        node: Node) -> None:
    pod = node.add_pod("del", ipv6=True)  # an IPv6 pod: ::6 on lo; TPROXY: policy routes
    before = state(pod)
    assert node.istio("ADD", pod, CASE["tproxy_wildcard"].args).code == 0
    after_add = routing(Namespace(pod.name))
    assert any(("IFA_ADDRESS", "::6") in address for address in after_add["addresses"])
    assert after_add["rules"] != before[2]["rules"]
    lock = pod.lock_path()
    assert os.path.exists(lock)

    done = node.istio("DEL", pod, CASE["tproxy_wildcard"].args)
    assert (done.code, done.stdout) == (0, "")
    assert state(pod) == before
    assert not os.path.exists(lock)  # the namespace's lock file goes with it
    assert node.istio("DEL", pod, CASE["tproxy_wildcard"].args).code == 0  # idempotent

    node.remove_pod(pod)  # the runtime deletes the sandbox; a DEL retried after that still succeeds
    gone = node.istio("DEL", pod, CASE["tproxy_wildcard"].args)
    assert (gone.code, gone.stdout) == (0, ""), gone.stderr
    assert node.istio("DEL", pod, CASE["tproxy_wildcard"].args, netns="").code == 0


# ---- CHECK ---------------------------------------------------------------------------------------

def test_check_passes_after_add_and_reports_drift_after_a_flush(node: Node) -> None:
    pod = node.add_pod("check")
    assert node.istio("ADD", pod, SEED_ARGS).code == 0
    passed = node.istio("CHECK", pod, SEED_ARGS)
    assert (passed.code, passed.stdout) == (0, ""), passed.stdout
    pod.run("iptables-legacy", "-w", "-t", "nat", "-F", "ISTIO_OUTPUT")
    drifted = node.istio("CHECK", pod, SEED_ARGS)
    assert drifted.code != 0
    error = only_one_answer(drifted.stdout)
    assert error["code"] == 101 and error["cniVersion"] == "1.0.0"
    assert "iptables-legacy nat ISTIO_OUTPUT rule" in error["details"], error
    assert node.istio("ADD", pod, SEED_ARGS).code == 0  # a re-ADD repairs it
    assert node.istio("CHECK", pod, SEED_ARGS).code == 0


def test_check_reports_a_missing_tproxy_route(node: Node) -> None:
    pod = node.add_pod("checktp")
    args = CASE["tproxy_wildcard"].args
    assert node.istio("ADD", pod, args).code == 0
    assert node.istio("CHECK", pod, args).code == 0
    subprocess.run(["nsenter", f"--net={pod.path}", sys.executable, "-c",
                    "from istio_init.host import routing\n"
                    "routing.remove_routing([routing.Routing('rule', 4, 1337, 133)])"], check=True, timeout=30)
    drifted = node.istio("CHECK", pod, args)
    assert drifted.code != 0 and "fwmark 0x539 lookup 133" in only_one_answer(drifted.stdout)["details"]


# ---- the validation init container ---------------------------------------------------------------

def _validate_as_proxy(pod: CniPod) -> subprocess.CompletedProcess:
    """`istio-init --run-validation --skip-rule-apply` as uid 1337, no capabilities, in the pod."""
    return subprocess.run(["nsenter", f"--net={pod.path}", "setpriv", "--reuid", str(PROXY_UID), "--regid",
                           str(PROXY_UID), "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                           sys.executable, "-m", "istio_init", *SEED_ARGS, "--run-validation",
                           "--skip-rule-apply", "--probe-timeout", "2s"],
                          capture_output=True, text=True, timeout=60, check=False)


def test_validation_without_capabilities_passes_after_add_and_fails_without(node: Node) -> None:
    bare = node.add_pod("novalid")
    without = _validate_as_proxy(bare)
    assert without.returncode == 126, without.stderr

    pod = node.add_pod("valid")
    assert node.istio("ADD", pod, SEED_ARGS).code == 0
    done = _validate_as_proxy(pod)
    assert done.returncode == 0, done.stderr
    assert "validation passed: IPv4" in done.stderr


# ---- excluded namespaces, bad configuration ----------------------------------------------------------

def test_an_excluded_namespace_gets_no_rules(node: Node) -> None:
    pod = node.add_pod("excl")
    before = state(pod)
    cni_args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME={pod.name}"
    done = node.istio("ADD", pod, SEED_ARGS, cni_args=cni_args, extra={"excludeNamespaces": ["kube-system"]})
    assert done.code == 0 and only_one_answer(done.stdout) == pod.result
    assert state(pod) == before
    # Another namespace under the same configuration is captured.
    other = node.istio("ADD", pod, SEED_ARGS, extra={"excludeNamespaces": ["kube-system"]})
    assert other.code == 0 and rules(pod) == golden("seed")


def _bad(node: Node, pod: CniPod, kind: str) -> str | dict:
    conf = node.istio_conf(pod, SEED_ARGS)
    if kind == "unknown flag":
        conf["args"] = [*SEED_ARGS, "--no-such-flag"]
    elif kind == "bad flag value":
        conf["args"] = [*SEED_ARGS, "-p", "abc"]
    elif kind == "runtime-owned flag":
        conf["args"] = [*SEED_ARGS, "--network-namespace", "/proc/1/ns/net"]
    elif kind == "missing prevResult":
        del conf["prevResult"]
    elif kind == "unsupported cniVersion":
        conf["cniVersion"] = "0.2.0"
    elif kind == "args not a list":
        conf["args"] = " ".join(SEED_ARGS)
    elif kind == "bad JSON":
        return json.dumps(conf)[:-7]
    return conf


@pytest.mark.parametrize("kind, code", [("unknown flag", 7), ("bad flag value", 7), ("runtime-owned flag", 7),
                                        ("missing prevResult", 7), ("unsupported cniVersion", 1),
                                        ("args not a list", 7), ("bad JSON", 6)])
def test_bad_configuration_is_a_cni_error_and_changes_nothing(node: Node, kind: str, code: int) -> None:
    pod = node.add_pod("bad")
    before = state(pod)
    done = node.istio("ADD", pod, conf=_bad(node, pod, kind))
    assert done.code != 0
    error = only_one_answer(done.stdout)
    assert set(error) == {"cniVersion", "code", "msg", "details"}
    assert error["code"] == code, error
    assert state(pod) == before
    if kind == "bad flag value":
        assert "-p/--envoy-port" in error["msg"] and "'abc'" in error["msg"]


def test_a_kernel_failure_is_error_100_and_leaves_the_pod_as_it_was(node: Node) -> None:
    pod = node.add_pod("fault")
    before = state(pod)
    # The backend fails right after the nat commit (tests/faultinject.py), so the rollback must undo it.
    faulty = [sys.executable, str(Path(__file__).with_name("cnifault.py")), "after-commit:nat"]
    done = node.istio("ADD", pod, SEED_ARGS, plugin=faulty)
    assert done.code != 0
    error = only_one_answer(done.stdout)
    assert error["code"] == 100 and "table nat" in error["details"], error
    assert state(pod) == before


# ---- parallel ADDs and the lock per namespace --------------------------------------------------------

def test_twenty_parallel_adds_each_get_exactly_their_rules(node: Node) -> None:
    # Three flag sets spread over the pods, so a pod that got another pod's rules would show.
    names = ["seed", "inbound_ports", "outbound_cidrs_v4"]
    pods = [node.add_pod(f"par{i}") for i in range(20)]
    started = time.monotonic()
    running = [node.start(PLUGIN, "ADD", pod, node.istio_conf(pod, CASE[names[i % 3]].args))
               for i, pod in enumerate(pods)]
    results = [wait(process, timeout=120) for process in running]
    elapsed = time.monotonic() - started
    for i, (pod, done) in enumerate(zip(pods, results)):
        assert done.code == 0, (pod.name, done.stdout, done.stderr)
        assert only_one_answer(done.stdout) == pod.result
        assert rules(pod) == golden(names[i % 3]), pod.name
    print(f"20 parallel ADDs: {elapsed:.2f} s")


def test_the_lock_is_per_namespace(node: Node) -> None:
    """An ADD waits for its own namespace's lock only: another pod's ADD goes ahead meanwhile."""
    busy, free = node.add_pod("busy"), node.add_pod("free")
    lock = busy.lock_path()
    assert lock != free.lock_path()
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a slow ADD in `busy` would hold it
        waiting = node.start(PLUGIN, "ADD", busy, node.istio_conf(busy, SEED_ARGS))
        started = time.monotonic()
        done = node.istio("ADD", free, SEED_ARGS)
        took = time.monotonic() - started
        time.sleep(max(0.0, 3.0 - took))  # an ADD takes well under a second: by now it would be done
        still_waiting = waiting.poll() is None
    finished = wait(waiting, timeout=90)  # the lock is released: the waiting ADD proceeds
    assert done.code == 0, done.stdout
    assert took < 20, f"ADD into another namespace waited {took:.1f}s"
    assert still_waiting, "the ADD into the busy namespace did not wait for that namespace's lock"
    assert finished.code == 0, finished.stdout
    assert rules(free) == golden("seed") and rules(busy) == golden("seed")
