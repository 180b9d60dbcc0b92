"""`istio-init-cni`: the same capture, installed from the node by the container runtime.

Clusters that cannot give pods NET_ADMIN (restricted Pod Security, OpenShift,
managed clusters) chain this plugin after their own CNI plugin. The runtime
runs it on the node for every pod sandbox, with the pod's network namespace in
CNI_NETNS, and it installs exactly what the init container would: the
configuration's `"args"` are the init container's `args:` and go through the
same click options and `config.from_sources`, so there is one contract. A
validation init container without capabilities (`--run-validation
--skip-rule-apply` as uid 1337) then proves the rules work.

The CNI specification (1.0 and 1.1) fixes the protocol: the command in
CNI_COMMAND, the network configuration with `prevResult` on stdin, the result
(ADD: prevResult unchanged, since this plugin adds no interface or address) or
an error object on stdout, exit status non-zero on error. This module decides
the answer; the process side (stdin, the log file, stdout kept for the one
answer) is `cli.cni_main`, as only the CLI does I/O.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, Mapping, NamedTuple

from istio_init.config import Config, cni_refusals
from istio_init.errors import CniError, ConfigError, IstioInitError

PROG = "istio-init-cni"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
CHECK_SINCE = "0.4.0"  # CHECK exists from spec 0.4.0 on

# Error codes of the CNI specification (SPEC.md, "Error"), and this plugin's own (100 and up).
ERR_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_ENVIRONMENT = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50  # STATUS, spec 1.1
ERR_APPLY = 100
ERR_DRIFT = 101
ERR_INTERNAL = 102

# Flags of `run` that make no sense when the runtime calls the plugin: it programs the
# namespace in CNI_NETNS for real, and validation belongs to the pod's own init container.
_RUNTIME_OWNED = {**cni_refusals(), "cleanup_only": "--cleanup-only (the runtime calls DEL)"}


def about() -> str:
    """What a person running the plugin by hand sees (no CNI_COMMAND), as the reference plugins print it."""
    from istio_init import __version__

    return (f"CNI {PROG} plugin v{__version__}: Istio's sidecar capture rules (istio-init), installed "
            "from the node for each pod\n"
            f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n"
            "The container runtime runs it with CNI_COMMAND set and the network configuration on stdin; "
            "its \"args\" are the init container's args.\n")


Log = Callable[..., None]  # log(message) or log(message, level), as runner.Log
ParseFlags = Callable[[list[str]], dict[str, Any]]


class Call(NamedTuple):
    """One invocation's surroundings, given by the CLI: the runtime's variables, the log, the flag parser."""

    environ: Mapping[str, str]
    log: Log
    parse_flags: ParseFlags


# ---- the network configuration ----------------------------------------------------------------

class NetConf:
    """The parts of the network configuration this plugin reads, checked before anything changes."""

    def __init__(self, data: Mapping[str, Any], command: str) -> None:
        self.version = _version(data)
        self.name = str(data.get("name", ""))
        self.args = _string_list(data, "args") + _ruleset_flags(data)
        self.env = _string_map(data, "env")
        self.exclude_namespaces = _string_list(data, "excludeNamespaces")
        log_file = data.get("logFile")
        if log_file is not None and (not isinstance(log_file, str) or not log_file or "\0" in log_file):
            raise CniError(ERR_CONFIG, "invalid network configuration: logFile must be a path (no NUL byte)")
        self.log_file: str | None = log_file
        self.prev_result = data.get("prevResult")
        if command in ("ADD", "CHECK") and not isinstance(self.prev_result, dict):
            raise CniError(ERR_CONFIG, "invalid network configuration: no prevResult",
                           f"{PROG} is a chained plugin: list it after the plugin that creates the interface")


def _version(data: Mapping[str, Any]) -> str:
    version = data.get("cniVersion")
    if not isinstance(version, str) or version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_VERSION, f"incompatible CNI version {version!r}",
                       "supported: " + ", ".join(SUPPORTED_VERSIONS))
    return version


def _string_list(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CniError(ERR_CONFIG, f"invalid network configuration: {key} must be a list of strings")
    return list(value)


def _string_map(data: Mapping[str, Any], key: str) -> dict[str, str]:
    value = data.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CniError(ERR_CONFIG, f"invalid network configuration: {key} must map names to strings")
    return dict(value)


def _ruleset_flags(data: Mapping[str, Any]) -> list[str]:
    """`rulesVersion` and `nativeNftables` as the init container's flags.

    They are passed on as flags, not interpreted here, so the flag parser
    decides whether they exist and which values are valid (one contract).
    """
    flags = []
    if "rulesVersion" in data:
        if not isinstance(data["rulesVersion"], str):
            raise CniError(ERR_CONFIG, "invalid network configuration: rulesVersion must be a string")
        flags += ["--rules-version", data["rulesVersion"]]
    if "nativeNftables" in data:
        if not isinstance(data["nativeNftables"], bool):
            raise CniError(ERR_CONFIG, "invalid network configuration: nativeNftables must be true or false")
        if data["nativeNftables"]:
            flags.append("--native-nftables")
    return flags


MAX_INPUT_BYTES = 16 << 20  # a network configuration with its prevResult is a few kilobytes


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(raw: bytes) -> Any:
    """The JSON document on stdin, as the specification's JSON: UTF-8, no NaN or Infinity, nested boundedly.

    Python's json module takes NaN and Infinity (a runtime's decoder does not,
    so echoing them in prevResult would be no answer at all) and raises
    RecursionError, not ValueError, on deep nesting; both are decode errors.
    """
    if len(raw) > MAX_INPUT_BYTES:
        raise CniError(ERR_DECODE, "cannot decode the network configuration",
                       f"larger than {MAX_INPUT_BYTES} bytes")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise CniError(ERR_DECODE, "cannot decode the network configuration", f"not UTF-8: {exc.reason} "
                       f"at byte {exc.start}") from None
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CniError(ERR_DECODE, "cannot decode the network configuration", detail) from None


def parse_netconf(data: Any, command: str) -> NetConf:
    if not isinstance(data, dict):
        raise CniError(ERR_DECODE, "cannot decode the network configuration", "not a JSON object")
    return NetConf(data, command)


def flags_config(args: list[str], env: Mapping[str, str], parse_flags: ParseFlags) -> Config:
    """The Config the init container would get from `args:` and `env:`, through its own parser.

    `parse_flags` is the CLI's: the `run` command's click options applied to
    `args` (cli.cni_flags), so the plugin and the init container share one
    flag contract. The runtime's environment is not consulted: only the
    configuration speaks, so two nodes with different environments program
    pods alike.
    """
    import click

    from istio_init.config import from_sources

    try:
        given = parse_flags(list(args))
    except click.exceptions.Exit:
        raise CniError(ERR_CONFIG, "invalid network configuration: args asked for help, not for rules") from None
    except click.ClickException as exc:
        raise CniError(ERR_CONFIG, f"invalid network configuration: args: {exc.format_message()}") from None
    for dest, label in _RUNTIME_OWNED.items():
        if given.get(dest) not in (None, False):
            raise CniError(ERR_CONFIG, f"invalid network configuration: args: {label} is not for the plugin")
    given.pop("cleanup_only", None)
    try:
        return from_sources(given, environ=env)
    except ConfigError as exc:
        raise CniError(ERR_CONFIG, f"invalid network configuration: args: {exc}") from None


def pod_namespace(cni_args: str) -> str | None:
    """K8S_POD_NAMESPACE from CNI_ARGS (`K=V;K=V`), as the kubelet's runtime sets it."""
    for item in cni_args.split(";"):
        key, _, value = item.partition("=")
        if key.strip() == "K8S_POD_NAMESPACE":
            return value.strip()
    return None


# ---- the namespace ------------------------------------------------------------------------------

def is_netns(path: str) -> bool:
    """Whether `path` is a network namespace (DEL succeeds when it is not, any more).

    A namespace file lives on nsfs, which every namespace shares with this
    process's own; a leftover plain file or an unmounted bind point does not.
    """
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


# ---- the adapter: the one place the plugin calls istio-init's core ------------------------------

def core(action: str, config: Config, call: Call) -> list[str]:
    """Run istio-init's apply ("ADD"), clean ("DEL") or drift check ("CHECK") in-process.

    The only function here that calls the runner, so a change of its interface
    is absorbed here. The runner enters config.network_namespace, takes the
    lock of that namespace (locks.namespace_lock: parallel ADDs for different
    pods do not wait for each other) and returns what the CLI would print,
    which goes to the log. Returns the drift found by CHECK (empty otherwise).
    """
    from istio_init import runner
    from istio_init.host import locks

    if action == "ADD":
        dump = runner.run(config, call.log)
        call.log(f"the tables after the apply:\n{dump.rstrip()}")
        return []
    if action == "DEL":
        runner.clean(config, call.log)
        locks.retire_namespace_lock()  # the pod is going; its lock file goes with it, under its lock
        return []
    # CHECK is `istio-init check`: the same plan, live state and comparison (check.py).
    from istio_init import check

    runner.enter_namespace(config)
    return [" ".join(difference.line().split()) for difference in check.compare_installed(config, call.log).differences]


# ---- the commands ---------------------------------------------------------------------------------

def _require(environ: Mapping[str, str], *names: str) -> None:
    for name in names:
        if not environ.get(name):
            raise CniError(ERR_ENVIRONMENT, f"{name} is not set", "the container runtime sets it")


def _excluded(conf: NetConf, environ: Mapping[str, str]) -> bool:
    namespace = pod_namespace(environ.get("CNI_ARGS", ""))
    return namespace is not None and namespace in conf.exclude_namespaces


def _kernel_error(exc: IstioInitError, doing: str) -> CniError:
    if isinstance(exc, ConfigError):
        return CniError(ERR_CONFIG, f"invalid network configuration: args: {exc}")
    return CniError(ERR_APPLY, f"{doing} failed", str(exc))


def cmd_add(conf: NetConf, call: Call) -> dict[str, Any]:
    environ = call.environ
    _require(environ, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    if _excluded(conf, environ):
        call.log("ADD: pod namespace is in excludeNamespaces; no rules")
        return conf.prev_result  # type: ignore[return-value]
    config = flags_config(conf.args, conf.env, call.parse_flags)
    if not is_netns(environ["CNI_NETNS"]):
        raise CniError(ERR_UNKNOWN_CONTAINER, f"no network namespace at {environ['CNI_NETNS']}")
    started = time.monotonic()
    try:
        core("ADD", config._replace(network_namespace=environ["CNI_NETNS"]), call)
    except IstioInitError as exc:
        raise _kernel_error(exc, "installing the capture") from None
    call.log(f"ADD: capture installed in {(time.monotonic() - started) * 1000:.1f} ms")
    return conf.prev_result  # type: ignore[return-value]


def cmd_del(conf: NetConf, call: Call) -> None:
    """Remove the rules; success when the namespace is already gone, and when run twice."""
    environ = call.environ
    _require(environ, "CNI_CONTAINERID", "CNI_IFNAME")
    path = environ.get("CNI_NETNS", "")
    if not (path and is_netns(path)):
        call.log(f"DEL: no network namespace at {path or '(CNI_NETNS empty)'}; nothing to remove")
        return
    try:
        config = flags_config(conf.args, conf.env, call.parse_flags)
    except CniError as exc:
        # The pod must still be deletable: clean removes every ISTIO_ chain whatever the flags.
        call.log(f"DEL: {exc.msg}; cleaning with the default flags")
        config = Config()
    try:
        core("DEL", config._replace(network_namespace=path), call)
    except IstioInitError as exc:
        raise CniError(ERR_APPLY, "removing the capture failed", str(exc)) from None


def cmd_check(conf: NetConf, call: Call) -> None:
    environ = call.environ
    _require(environ, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    if tuple(map(int, conf.version.split("."))) < tuple(map(int, CHECK_SINCE.split("."))):
        raise CniError(ERR_VERSION, f"CHECK needs cniVersion {CHECK_SINCE} or later, got {conf.version}")
    if _excluded(conf, environ):
        return
    config = flags_config(conf.args, conf.env, call.parse_flags)
    if not is_netns(environ["CNI_NETNS"]):
        raise CniError(ERR_UNKNOWN_CONTAINER, f"no network namespace at {environ['CNI_NETNS']}")
    try:
        problems = core("CHECK", config._replace(network_namespace=environ["CNI_NETNS"]), call)
    except IstioInitError as exc:
        raise _kernel_error(exc, "reading the namespace's rules") from None
    if problems:
        raise CniError(ERR_DRIFT, "the capture rules differ from the configuration", "; ".join(problems))


def cmd_status() -> None:
    """Ready when the tools every backend reads with are installed (spec 1.1 STATUS)."""
    if not any(shutil.which(tool) for tool in ("iptables-legacy-save", "iptables-nft-save")):
        raise CniError(ERR_NOT_AVAILABLE, "no iptables-legacy-save or iptables-nft-save on this node")


def cmd_version(data: Any) -> dict[str, Any]:
    asked = data.get("cniVersion") if isinstance(data, dict) else None
    return {"cniVersion": asked if asked in SUPPORTED_VERSIONS else LATEST_VERSION,
            "supportedVersions": list(SUPPORTED_VERSIONS)}


# ---- one invocation ------------------------------------------------------------------------------

def decide(call: Call, data: Any, log_to: Callable[[str], None]) -> dict[str, Any] | None:
    """The answer for stdout, or None (DEL, CHECK, STATUS and GC succeed silently).

    `data` is the decoded stdin; `log_to(path)` is called with the
    configuration's logFile, once it is read.
    """
    environ = call.environ
    command = environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        return cmd_version(data)
    if command not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
        raise CniError(ERR_ENVIRONMENT, f"CNI_COMMAND {command!r} is not a CNI command")
    conf = parse_netconf(data, command)
    if conf.log_file is not None:
        log_to(conf.log_file)
    call.log(f"{command} netns={environ.get('CNI_NETNS', '')} args={environ.get('CNI_ARGS', '')}")
    if command == "ADD":
        return cmd_add(conf, call)
    if command == "DEL":
        cmd_del(conf, call)
    elif command == "CHECK":
        cmd_check(conf, call)
    elif command == "STATUS":
        cmd_status()
    # GC (spec 1.1): nothing of ours outlives a pod's namespace but its lock file, removed by DEL.
    return None


def _encode(answer: dict[str, Any]) -> bytes:
    """One JSON document and a newline: strict JSON (no NaN), ASCII, so any runtime's decoder reads it."""
    return (json.dumps(answer, allow_nan=False) + "\n").encode("ascii")


def _error_object(version: str, code: int, msg: str, details: str) -> bytes:
    def text(value: str) -> str:  # a lone surrogate (an undecodable path) is no Unicode text
        return value.encode("utf-8", "replace").decode("utf-8")

    return _encode({"cniVersion": version, "code": code, "msg": text(msg), "details": text(details)})


def answer(command: str, stdin: bytes, log: Callable[[str], None],
           decide: Callable[[Any], dict[str, Any] | None]) -> tuple[int, bytes]:
    """(exit status, the bytes for stdout) of one call, whatever the input: `decide` gets the decoded stdin.

    The one place an answer is made, for both CNI forms (this process and the
    node agent, cni_agent.py): a success gives the result (ADD, VERSION) or
    nothing (DEL, CHECK, STATUS, GC), every failure exactly one error object,
    and what is returned has been encoded already, so it is always one valid
    JSON document (or nothing): a result that cannot be encoded becomes an
    error object, and so does a bug.
    """
    version = LATEST_VERSION
    try:
        try:
            data = decode(stdin)
        except CniError:
            if command != "VERSION":
                raise
            data = None  # VERSION answers whatever it is given (the newest version, then)
        asked = data.get("cniVersion") if isinstance(data, dict) else None
        version = asked if isinstance(asked, str) and asked else version
        result = decide(data)
        if result is None:
            return 0, b""
        try:
            return 0, _encode(result)
        except (ValueError, TypeError, RecursionError) as exc:
            raise CniError(ERR_DECODE, "the prevResult cannot be passed on as JSON", str(exc)) from None
    except CniError as exc:
        _log_quietly(log, f"error {exc.code}: {exc.msg}" + (f": {exc.details}" if exc.details else ""))
        return 1, _error_object(version, exc.code, exc.msg, exc.details)
    except Exception as exc:  # a bug: still the protocol's error object, and the log has the type
        _log_quietly(log, f"unexpected error: {type(exc).__name__}: {exc}")
        return 1, _error_object(version, ERR_INTERNAL, f"unexpected error: {type(exc).__name__}", str(exc))


def _log_quietly(log: Callable[[str], None], message: str) -> None:
    try:
        log(message)
    except Exception:  # the answer matters more than its log line
        pass
