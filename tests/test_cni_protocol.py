"""istio-init-cni's protocol edges and its shipped configuration; no namespaces, no root needed.

The plugin's behaviour in a pod namespace is tests/test_cni.py's; here are the
answers a runtime gets before any namespace matters (VERSION, STATUS, a
missing variable, an unknown command, a missing namespace) and the check that
the conflist shipped in container/kubernetes/cni gives the seed's rules.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from pathlib import Path

from cases import CASES, SEED_ARGS
from cninode import PLUGIN
from istio_init.cli import cni_flags
from istio_init.cni import NetConf, flags_config, pod_namespace
from istio_init.iptables_save.write import render_plan
from istio_init.rulesets import plan

ROOT = Path(__file__).resolve().parent.parent


def _plugin(command: str, text: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, **(extra_env or {})}
    return subprocess.run([str(PLUGIN)], input=text, env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_version_answers_with_the_asked_version_and_lists_1_0_and_1_1() -> None:
    done = _plugin("VERSION", '{"cniVersion": "1.1.0"}')
    assert done.returncode == 0
    answer = json.loads(done.stdout)
    assert answer["cniVersion"] == "1.1.0"
    assert {"1.0.0", "1.1.0"} <= set(answer["supportedVersions"])


def test_status_succeeds_silently_when_the_tools_are_there() -> None:
    done = _plugin("STATUS", json.dumps({"cniVersion": "1.1.0", "name": "podnet", "type": "istio-init-cni"}))
    assert (done.returncode, done.stdout) == (0, "")
    without_tools = _plugin("STATUS", json.dumps({"cniVersion": "1.1.0", "name": "podnet"}),
                            {"PATH": "/nonexistent"})
    assert without_tools.returncode != 0 and json.loads(without_tools.stdout)["code"] == 50


def test_missing_environment_unknown_command_and_missing_namespace_are_cni_errors() -> None:
    conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "istio-init-cni", "prevResult": {}})
    missing = _plugin("ADD", conf)
    assert missing.returncode != 0 and json.loads(missing.stdout)["code"] == 4
    assert "CNI_CONTAINERID" in json.loads(missing.stdout)["msg"]
    unknown = _plugin("FROB", conf)
    assert unknown.returncode != 0 and json.loads(unknown.stdout)["code"] == 4
    gone = _plugin("ADD", conf, {"CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/no-such-ns"})
    assert gone.returncode != 0 and json.loads(gone.stdout)["code"] == 3


def test_pod_namespace_is_read_from_cni_args() -> None:
    assert pod_namespace("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1") == "shop"
    assert pod_namespace("IgnoreUnknown=1") is None


def test_the_shipped_conflist_gives_the_seed_rules() -> None:
    conflist = json.loads((ROOT / "container/kubernetes/cni/10-podnet.conflist").read_text())
    entry = next(p for p in conflist["plugins"] if p["type"] == "istio-init-cni")
    conf = NetConf({"cniVersion": conflist["cniVersion"], **entry, "prevResult": {}}, "ADD")
    assert conf.args == list(SEED_ARGS)
    seed = next(case for case in CASES if case.name == "seed")
    assert render_plan(plan(flags_config(conf.args, {}, cni_flags), False)) == seed.golden.read_text()


def test_rules_version_and_native_nftables_become_the_init_containers_flags() -> None:
    data = {"cniVersion": "1.0.0", "args": ["-i", "*"], "rulesVersion": "current", "nativeNftables": True}
    assert NetConf(data, "DEL").args == ["-i", "*", "--rules-version", "current", "--native-nftables"]
    assert NetConf({**data, "nativeNftables": False}, "DEL").args == ["-i", "*", "--rules-version", "current"]


# ---- issue 19, finding 5: one valid JSON document on stdout, whatever the input and descriptors ----

_NO_NETNS = {"CNI_CONTAINERID": "x", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/istio-init-no-such-ns"}


def _strict(text: str) -> dict:
    """The one JSON document `text` must be: one line, strict JSON (no NaN or Infinity), an object."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in the answer: {text[:200]!r}")

    assert text.endswith("\n") and text.count("\n") == 1, text[:500]
    answer = json.loads(text, parse_constant=refuse)
    assert isinstance(answer, dict)
    return answer


def _raw_plugin(command: str, stdin: bytes | None, env: dict[str, str], shell: str = '"$0"') -> tuple[int, bytes]:
    """The plugin started through sh, so a test can close its descriptors (`2>&-`) as a runtime might."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command, **env}
    done = subprocess.run(["sh", "-c", f"exec {shell}", str(PLUGIN)], input=stdin, env=full, capture_output=True,
                          timeout=60, check=False)
    return done.returncode, done.stdout


def _conf(**extra: object) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "istio-init-cni", "prevResult": {}, **extra})


@pytest.mark.parametrize("stdin,detail", [
    (b"[" * 1000 + b"]" * 1000, "nested too deeply"),
    (b'{"cniVersion": "1.0.0", "prevResult": ' + b"{\"a\": " * 5000 + b"1" + b"}" * 5001, "nested too deeply"),
    (b'{"cniVersion": "1.0.0", "name": "n", "prevResult": {"x": NaN}}', "NaN is not JSON"),
    (b'{"cniVersion": "1.0.0", "name": "n", "prevResult": {"x": Infinity}}', "Infinity is not JSON"),
    (b'{"cniVersion": "1.0.0", "name": "n", "prevResult": {"x": [-Infinity]}}', "-Infinity is not JSON"),
    (b'{"cniVersion": "1.0.0", "name": "\xff"}', "not UTF-8"),
    (b"", "Expecting value"),
    (None, "Expecting value"),  # stdin closed
])
def test_undecodable_input_is_a_decode_error_object(stdin: bytes | None, detail: str) -> None:
    shell = '"$0" <&-' if stdin is None else '"$0"'
    code, out = _raw_plugin("ADD", stdin or b"", _NO_NETNS, shell)
    answer = _strict(out.decode())
    assert code == 1 and answer["code"] == 6 and detail in answer["details"], answer


@pytest.mark.parametrize("shell", ['"$0" 2>&-', '"$0" 2>&- 0<&-', '"$0" 2>/dev/full'])
def test_closed_or_full_stderr_never_reaches_the_answer(shell: str) -> None:
    code, out = _raw_plugin("ADD", _conf().encode(), _NO_NETNS, shell)
    answer = _strict(out.decode())
    assert code == 1 and answer["code"] in (3, 6), answer


def test_an_unwritable_log_file_loses_log_lines_not_the_answer() -> None:
    code, out = _raw_plugin("ADD", _conf(logFile="/dev/full").encode(), _NO_NETNS)
    assert code == 1 and _strict(out.decode())["code"] == 3
    version_code, version = _raw_plugin("VERSION", b'{"cniVersion": "1.0.0"}', {}, '"$0" 2>/dev/full')
    assert version_code == 0 and _strict(version.decode())["cniVersion"] == "1.0.0"


@pytest.mark.parametrize("log_file", ["/tmp/a\u0000b", "", 7])
def test_a_log_file_that_is_no_path_is_a_configuration_error(log_file: object) -> None:
    code, out = _raw_plugin("ADD", _conf(logFile=log_file).encode(), _NO_NETNS)
    answer = _strict(out.decode())
    assert code == 1 and answer["code"] == 7 and "logFile" in answer["msg"], answer


def test_a_closed_stdout_is_no_crash() -> None:
    done = subprocess.run(["sh", "-c", 'exec "$0" >&-', str(PLUGIN)], input=_conf().encode(), capture_output=True,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": "ADD", **_NO_NETNS},
                          timeout=60, check=False)
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done.stderr[-500:]
