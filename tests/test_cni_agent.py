"""The CNI form's node agent and static host plugin, driven as a runtime drives a chained plugin.

Installer tests need no root. The others run `istio-init cni-agent` as a
process (its fixed command line) and call the host plugin, built by
scripts/build-cni-plugin, inside a node namespace with pods wired by the
reference bridge plugin (cninode.py). test_containerd_cni.py does the same
through containerd itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from cases_cni import CNI_CASES, CniCase
from cniagent import AgentDirs, AgentProcess, build_plugin, primary_plugins
from cninode import CniPod, Node, reference_plugins_missing
from istio_golden import canonical, restore_inputs, tables_in_order
from istio_init import cni_install
from istio_init.cni_install import PLUGIN_TYPE
from nsutil import Namespace

CAPABILITY = "io.kubernetes.cri.pod-annotations"
BRIDGE = {"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni0",
          "ipam": {"type": "host-local", "subnet": "198.51.100.0/24"}}
MESHED = {"sidecar.istio.io/status": '{"initContainers":["istio-validation"],"containers":["istio-proxy"]}'}


# ---- the installer --------------------------------------------------------------------------------

def test_a_conf_becomes_a_conflist_with_our_entry_last_exactly_once(tmp_path: Path) -> None:
    (tmp_path / "10-podnet.conf").write_text(json.dumps(BRIDGE))
    (tmp_path / "20-other.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "x",
                                                            "plugins": [{"type": "ptp"}]}))
    first = cni_install.chain(tmp_path, "/run/x")
    assert first.changed and first.path == tmp_path / "10-podnet.conflist"
    assert not (tmp_path / "10-podnet.conf").exists()
    for _ in range(3):
        assert not cni_install.chain(tmp_path, "/run/x").changed
    plugins = json.loads(first.path.read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", PLUGIN_TYPE]
    assert plugins[1]["capabilities"] == {CAPABILITY: True} and plugins[1]["runDir"] == "/run/x"
    assert plugins[0]["ipam"] == BRIDGE["ipam"]
    assert cni_install.is_chained(tmp_path, "/run/x")
    assert json.loads((tmp_path / "20-other.conflist").read_text())["plugins"] == [{"type": "ptp"}]


def test_the_primary_is_the_first_valid_file_and_duplicates_are_merged(tmp_path: Path) -> None:
    (tmp_path / "00-broken.conflist").write_text("{not json")
    (tmp_path / "01-empty.conflist").write_text(json.dumps({"name": "e", "plugins": []}))
    (tmp_path / "05-notes.txt").write_text("{}")
    ours = cni_install.plugin_entry("/run/x")
    (tmp_path / "10-podnet.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "podnet", "plugins": [BRIDGE, ours, {"type": "portmap"}, ours]}))
    chained = cni_install.chain(tmp_path, "/run/x")
    assert chained.changed and chained.path == tmp_path / "10-podnet.conflist"
    assert [p["type"] for p in json.loads(chained.path.read_text())["plugins"]] == ["bridge", "portmap", PLUGIN_TYPE]
    assert cni_install.unchain(tmp_path) == [chained.path]
    assert [p["type"] for p in json.loads(chained.path.read_text())["plugins"]] == ["bridge", "portmap"]
    assert not cni_install.is_chained(tmp_path, "/run/x")


def test_nothing_to_chain_into(tmp_path: Path) -> None:
    assert cni_install.chain(tmp_path, "/run/x") == cni_install.Chained(None, False)


def test_the_binary_is_replaced_atomically_and_only_when_it_differs(tmp_path: Path) -> None:
    plugin = tmp_path / "plugin"
    plugin.write_bytes(b"v1")
    bin_dir = tmp_path / "bin"
    assert cni_install.install_binary(plugin, bin_dir)
    assert not cni_install.install_binary(plugin, bin_dir)
    plugin.write_bytes(b"v2")
    assert cni_install.install_binary(plugin, bin_dir)
    assert (bin_dir / PLUGIN_TYPE).read_bytes() == b"v2" and os.access(bin_dir / PLUGIN_TYPE, os.X_OK)
    assert sorted(os.listdir(bin_dir)) == [PLUGIN_TYPE]


# ---- the host plugin ------------------------------------------------------------------------------

def test_the_host_plugin_is_static(tmp_path_factory: pytest.TempPathFactory) -> None:
    plugin = build_plugin(tmp_path_factory.mktemp("plugin"))
    done = subprocess.run(["ldd", str(plugin)], capture_output=True, text=True, timeout=30)
    assert "not a dynamic executable" in done.stdout + done.stderr


def test_an_agent_that_hangs_up_is_an_unreachable_agent(tmp_path: Path,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """The plugin's answer when the agent closes the connection without one (a crashed call)."""
    import socket
    import threading

    plugin = build_plugin(tmp_path_factory.mktemp("plugin"))
    (tmp_path / "excluded-namespaces").write_text("kube-system\n")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "agent.sock"))
    listener.listen(8)
    listener.settimeout(10)

    def hang_up() -> None:
        for _ in range(3):
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                conn.close()

    server = threading.Thread(target=hang_up)
    server.start()
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "198.51.100.9/24"}]}
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": PLUGIN_TYPE, "runDir": str(tmp_path),
                       "prevResult": prev})
    try:
        answers = {}
        for command, namespace in (("ADD", "default"), ("ADD", "kube-system"), ("DEL", "default")):
            env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "",
                   "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=p"}
            done = subprocess.run([str(plugin)], input=conf, env=env, capture_output=True, text=True, timeout=30)
            answers[(command, namespace)] = (done.returncode, done.stdout)
    finally:
        server.join(timeout=15)
        listener.close()
    code, out = answers[("ADD", "default")]
    assert code == 1 and json.loads(out)["code"] == 11
    code, out = answers[("ADD", "kube-system")]
    assert code == 0 and json.loads(out) == prev
    assert answers[("DEL", "default")] == (0, "")


# ---- the agent and the plugin together ------------------------------------------------------------

@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    missing = reference_plugins_missing()
    if missing:
        pytest.skip(missing)
    created = Node.create(tmp_path, "agent")
    try:
        yield created
    finally:
        created.remove()


@pytest.fixture
def agent(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    plugin = build_plugin(tmp_path_factory.mktemp("plugin"))
    dirs = AgentDirs.under(tmp_path / "host")
    (dirs.conf_dir / "10-podnet.conf").write_text(json.dumps(BRIDGE))
    started = AgentProcess.start(plugin, dirs, tmp_path / "agent.log")
    try:
        yield started
    finally:
        started.stop()


def _conf(agent: AgentProcess, pod: CniPod | None, annotations: dict[str, str] | None, **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {"cniVersion": "1.0.0", "name": "podnet", **cni_install.plugin_entry(str(agent.dirs.run_dir))}
    conf["runtimeConfig"] = {CAPABILITY: annotations}
    if annotations is False:
        conf.pop("runtimeConfig")
    if pod is not None:
        conf["prevResult"] = pod.result
    conf.update(extra)
    return conf


def _call(node: Node, agent: AgentProcess, command: str, pod: CniPod | None, annotations: Any,
          namespace: str = "default", netns: str | None = None) -> Any:
    name = pod.name if pod else "none"
    return node.invoke(agent.dirs.bin_dir / PLUGIN_TYPE, command, pod, _conf(agent, pod, annotations),
                       cni_args=f"K8S_POD_NAME={name};IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace}", netns=netns)


def _ours(pod: CniPod) -> str:
    return "".join(line for line in pod.save().splitlines(keepends=True) if "ISTIO" in line)


@pytest.mark.root
def test_the_agent_chains_itself_and_leaves_on_sigterm(agent: AgentProcess) -> None:
    dirs = agent.dirs
    assert [p["type"] for p in primary_plugins(dirs.conf_dir)] == ["bridge", PLUGIN_TYPE]
    assert os.access(dirs.bin_dir / PLUGIN_TYPE, os.X_OK)
    assert (dirs.run_dir / "excluded-namespaces").read_text() == "kube-system\n"
    # The primary CNI rewrites its file (as a .conf again, and as a conflist): undone within 5 s.
    for rewrite in (lambda: (dirs.conf_dir / "10-podnet.conf").write_text(json.dumps(BRIDGE)),
                    lambda: (dirs.conf_dir / "10-podnet.conflist").write_text(json.dumps(
                        {"cniVersion": "1.0.0", "name": "podnet", "plugins": [BRIDGE]}))):
        rewrite()
        started = time.monotonic()
        while [p["type"] for p in primary_plugins(dirs.conf_dir)] != ["bridge", PLUGIN_TYPE]:
            assert time.monotonic() - started < 5, "not re-chained within 5 s"
            time.sleep(0.05)
        assert sorted(p.name for p in dirs.conf_dir.iterdir()) == ["10-podnet.conflist"]
    assert agent.readyz() == 200
    assert agent.stop(signal.SIGTERM) == 0
    assert [p["type"] for p in primary_plugins(dirs.conf_dir)] == ["bridge"]
    assert not (dirs.bin_dir / PLUGIN_TYPE).exists()
    assert not (dirs.run_dir / "agent.sock").exists()


@pytest.mark.root
def test_readyz_fails_when_the_entry_is_gone(agent: AgentProcess) -> None:
    assert agent.readyz() == 200
    os.unlink(agent.dirs.bin_dir / PLUGIN_TYPE)
    status = agent.readyz()
    deadline = time.monotonic() + 5
    while agent.readyz() != 200:  # put back by the agent within a second or two
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status in (200, 503)


@pytest.mark.root
@pytest.mark.parametrize("case", [c for c in CNI_CASES if c.by_annotations_only], ids=lambda c: c.name)
def test_a_meshed_pod_gets_istios_cni_rules(case: CniCase, node: Node, agent: AgentProcess, netns: Namespace) -> None:
    pod = node.add_pod(case.name.lower())
    done = _call(node, agent, "ADD", pod, case.annotations)
    assert done.code == 0, done.stdout + agent.log.read_text()[-3000:]
    assert done.answer == pod.result
    istio = restore_inputs(case.istio_golden.read_text(), {})[0]
    netns.run("iptables-legacy-restore", "--noflush", input=istio)
    tables = tables_in_order(istio)
    assert canonical(pod.save(), tables) == canonical(netns.save(), tables)
    lock = Path(pod.lock_path())
    assert lock.exists()
    first = _call(node, agent, "DEL", pod, case.annotations)
    assert first.code == 0 and first.stdout == ""
    assert not lock.exists()  # the namespace itself goes with the sandbox, as with Istio's plugin
    assert _call(node, agent, "DEL", pod, None, netns="").code == 0


@pytest.mark.root
@pytest.mark.parametrize("namespace, annotations", [
    ("default", None), ("default", {}), ("kube-system", MESHED), ("default", {**MESHED, "sidecar.istio.io/inject": "false"}),
    ("default", {"sidecar.istio.io/status": '{"initContainers":["istio-init"],"containers":["istio-proxy"]}'}),
])
def test_pods_the_agent_skips_get_nothing(namespace: str, annotations: Any, node: Node, agent: AgentProcess) -> None:
    pod = node.add_pod("skip")
    done = _call(node, agent, "ADD", pod, annotations, namespace=namespace)
    assert done.code == 0, done.stdout
    assert done.answer == pod.result
    assert _ours(pod) == ""


@pytest.mark.root
def test_a_bad_annotation_fails_the_add_naming_it(node: Node, agent: AgentProcess) -> None:
    pod = node.add_pod("bad")
    done = _call(node, agent, "ADD", pod, {**MESHED, "traffic.sidecar.istio.io/excludeInboundPorts": "80,eighty"})
    assert done.code != 0
    assert done.answer["code"] == 7
    assert "traffic.sidecar.istio.io/excludeInboundPorts" in done.answer["msg"] and "eighty" in done.answer["msg"]
    assert _ours(pod) == ""
    missing = _call(node, agent, "ADD", pod, False)
    assert missing.code != 0 and CAPABILITY in missing.answer["msg"] and "containerd 1.5" in missing.answer["msg"]


@pytest.mark.root
def test_version_and_a_pod_outside_kubernetes(node: Node, agent: AgentProcess) -> None:
    version = _call(node, agent, "VERSION", None, None)
    assert version.code == 0 and "1.0.0" in version.answer["supportedVersions"]
    pod = node.add_pod("bare")
    done = node.invoke(agent.dirs.bin_dir / PLUGIN_TYPE, "ADD", pod, _conf(agent, pod, MESHED), cni_args="IgnoreUnknown=1")
    assert done.code == 0 and done.answer == pod.result
    assert _ours(pod) == ""


@pytest.mark.root
def test_without_the_agent_only_excluded_namespaces_start(node: Node, agent: AgentProcess) -> None:
    pod = node.add_pod("down")
    agent.stop(signal.SIGKILL)
    version = _call(node, agent, "VERSION", None, None)
    assert version.code == 0 and "1.0.0" in version.answer["supportedVersions"]
    meshed = _call(node, agent, "ADD", pod, MESHED)
    assert meshed.code != 0 and meshed.answer["code"] == 11
    assert "not reachable" in meshed.answer["msg"]
    system = _call(node, agent, "ADD", pod, MESHED, namespace="kube-system")
    assert system.code == 0 and system.answer == pod.result
    assert _call(node, agent, "DEL", pod, MESHED).code == 0
    assert _ours(pod) == ""


# ---- the manifests --------------------------------------------------------------------------------

KUBE = Path(__file__).resolve().parent.parent / "container" / "kubernetes" / "cni"


def test_the_daemonset_runs_the_agent_as_documented() -> None:
    import yaml

    from istio_init.cli import cni_agent_command

    documents = {d["kind"]: d for d in yaml.safe_load_all((KUBE / "daemonset.yaml").read_text())}
    config = documents["ConfigMap"]["data"]
    template = documents["DaemonSet"]["spec"]["template"]
    spec, container = template["spec"], template["spec"]["containers"][0]
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["hostNetwork"] is True and "hostPID" not in spec
    assert set(container["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    args = [a.replace("$(EXCLUDE_NAMESPACES)", config["EXCLUDE_NAMESPACES"]) for a in container["args"]]
    assert args[0] == "cni-agent"
    with cni_agent_command.make_context("cni-agent", args[1:]) as ctx:
        params = ctx.params
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    assert host[mounts[params["cni_bin_dir"]]] == "/opt/cni/bin"
    assert host[mounts[params["cni_conf_dir"]]] == "/etc/cni/net.d"
    assert host[mounts[params["run_dir"]]] == params["run_dir"]  # the same path on the node and inside
    assert params["exclude_namespaces"] == "kube-system" and params["health_port"] == 8000
    assert set(config) >= {"ISTIO_META_DNS_CAPTURE", "INVALID_DROP", "ISTIO_DUAL_STACK"}


def test_the_example_deployment_is_captured_and_validated() -> None:
    import yaml

    from istio_init.podcapture import Capture, MeshSettings, PodFacts, decide

    template = yaml.safe_load((KUBE / "deployment.yaml").read_text())["spec"]["template"]
    decision = decide(PodFacts("default", "nginx", template["metadata"]["annotations"]), MeshSettings())
    assert isinstance(decision, Capture)
    validation = next(c for c in template["spec"]["initContainers"] if c["name"] == "istio-validation")
    assert {"--run-validation", "--skip-rule-apply"} <= set(validation["args"])
    assert validation["securityContext"]["runAsUser"] == 1337


def test_the_plugin_and_the_agent_speak_the_same_protocol() -> None:
    """The C plugin's constants are the agent's and the DaemonSet's (spelled once per language)."""
    import re

    import yaml

    from istio_init import cni, cni_agent

    source = (Path(__file__).resolve().parent.parent / "cniplugin" / "istio-init-cni.c").read_text()
    defines = dict(re.findall(r'^#define (\w+) "(.*)"$', source, re.MULTILINE))
    assert defines["MAGIC"].encode().decode("unicode_escape").encode() == cni_agent.MAGIC
    assert defines["SOCKET_NAME"] == cni_agent.SOCKET_NAME
    assert defines["EXCLUDED_NAME"] == cni_agent.EXCLUDED_NAME
    daemonset = next(d for d in yaml.safe_load_all((KUBE / "daemonset.yaml").read_text()) if d["kind"] == "DaemonSet")
    args = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--run-dir") + 1] == defines["DEFAULT_RUN_DIR"]
    versions = re.search(r'supportedVersions\\":\[(.*?)\]', source)
    assert versions is not None
    assert re.findall(r'\\"([0-9.]+)\\"', versions.group(1)) == list(cni.SUPPORTED_VERSIONS)
