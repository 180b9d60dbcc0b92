"""`istio-init cni-agent`: the node agent of the CNI form, one warm process per node.

The runtime calls the small static host plugin (cniplugin/istio-init-cni.c)
for every pod sandbox; the plugin forwards the call and the pod's network
namespace, as an open descriptor, over this agent's Unix socket. The agent
decides per pod (podcapture.py), enters the namespace through the descriptor
(no hostPID, no /var/run/netns mount), takes that namespace's lock and applies
through the same runner as the init container. Each call is served by a
forked child of the warm process: its modules are loaded once, a call that
fails or hangs cannot take the agent down, and the child's namespace switch
never touches the agent's own.

Besides serving, the agent installs itself and stays installed (cni_install.py):
the binary in the CNI bin dir, its entry chained into the primary
configuration (checked every second, so a rewrite by the primary CNI is undone
within seconds), `excluded-namespaces` in the run dir for the plugin's own use
when the agent is down; on SIGTERM or SIGINT it removes the entry and the
binary first, so the node never keeps a plugin that nobody answers for.
`/readyz` on the health port answers 200 only while all of that holds.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from istio_init import cni, cni_install
from istio_init.errors import AnnotationError, CniError, IstioInitError, PodLookupError
from istio_init.podcapture import Capture, MeshSettings, PodFacts, decide, facts_from_runtime, k8s_pod

SOCKET_NAME = "agent.sock"
EXCLUDED_NAME = "excluded-namespaces"
MAGIC = b"ISTIO-INIT-CNI/1\n"  # the plugin's first bytes, carrying the descriptor
MAX_REQUEST = 16 * 1024 * 1024
REQUEST_TIMEOUT = 30.0
WATCH_INTERVAL = 1.0
CHILD_WAIT_SECONDS = 30.0
# Modules a call needs, loaded once in the agent so that each forked child starts warm.
_WARM_MODULES = ("istio_init.runner", "istio_init.apply", "istio_init.backends", "istio_init.host.addresses",
                 "istio_init.host.routing", "istio_init.host.nft_tables", "istio_init.host.namespace",
                 "istio_init.check", "istio_init.host.locks", "istio_init.iptables_save.write",
                 "istio_init.rulesets.current", "istio_init.backends.iptables.restore",
                 "istio_init.backends.iptables.backend", "istio_init.backends.iptables.tools",
                 "istio_init.iptables_save.read", "yaml")

Log = Callable[..., None]
# Where a pod's facts come from: (CNI_ARGS, the configuration's runtimeConfig) -> PodFacts. The
# runtime's annotations by default; a source that asks the API server can take its place.
PodFactsSource = Callable[[str, Any], PodFacts]


@dataclass(frozen=True)
class AgentOptions:
    """The agent's command line (fixed: the DaemonSet and other tools use it)."""

    plugin: Path
    cni_bin_dir: Path
    cni_conf_dir: Path
    run_dir: Path
    mesh: MeshSettings
    health_port: int = 8000
    health_address: str = ""
    pod_facts: PodFactsSource = facts_from_runtime


@dataclass(frozen=True)
class Request:
    """One forwarded call: the CNI_* variables, the configuration, the namespace descriptor (or None)."""

    environ: Mapping[str, str]
    stdin: bytes  # decoded by cni.answer, as the CNI specification's stdin
    netns_fd: int | None


class ProtocolError(Exception):
    """The peer did not speak the plugin's wire format."""


# ---- one call -----------------------------------------------------------------------------------

def read_request(conn: socket.socket) -> Request:
    """Read the plugin's request: magic (with the descriptor), NAME=VALUE\\0 entries, \\0, configuration."""
    conn.settimeout(REQUEST_TIMEOUT)
    fds: list[int] = []
    head = b""
    while len(head) < len(MAGIC):
        data, ancillary, _, _ = conn.recvmsg(len(MAGIC) - len(head), socket.CMSG_SPACE(4 * array.array("i").itemsize),
                                             socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[:len(payload) - len(payload) % received.itemsize])
                fds += received.tolist()
        if not data:
            break
        head += data
    for extra in fds[1:]:
        os.close(extra)
    fd = fds[0] if fds else None
    try:
        if head != MAGIC:
            raise ProtocolError("not an istio-init-cni request")
        chunks, size = [], 0
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_REQUEST:
                raise ProtocolError("request too large")
            chunks.append(chunk)
        body = b"".join(chunks)
        environ: dict[str, str] = {}
        position = 0
        while True:
            end = body.find(b"\0", position)
            if end < 0:
                raise ProtocolError("truncated request")
            entry = body[position:end].decode("utf-8", "replace")
            position = end + 1
            if not entry:
                break
            name, _, value = entry.partition("=")
            environ[name] = value
        return Request(environ, body[position:], fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def respond(request: Request, data: Any, mesh: MeshSettings, log: Log,
            pod_facts: PodFactsSource = facts_from_runtime) -> dict[str, Any] | None:
    """The answer to one call, `data` its decoded configuration (raises CniError for the error object)."""
    environ = request.environ
    command = environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        return cni.cmd_version(data)
    if command not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
        raise CniError(cni.ERR_ENVIRONMENT, f"CNI_COMMAND {command!r} is not a CNI command")
    conf = cni.parse_netconf(data, command)
    namespace, name = k8s_pod(environ.get("CNI_ARGS", ""))
    log(f"{command} pod {namespace or '-'}/{name or '-'} container {environ.get('CNI_CONTAINERID', '-')[:12]}")
    # By pid, not /proc/self: the path is also the xtables lock of the iptables tools the apply may run.
    netns = f"/proc/{os.getpid()}/fd/{request.netns_fd}" if request.netns_fd is not None else None
    call = cni.Call(environ, log, _no_flags)
    if command == "ADD" or command == "CHECK":
        decision = _decide(request, data, mesh, pod_facts)
        if not isinstance(decision, Capture):
            log(f"{command}: not captured: {decision.reason}")
            return conf.prev_result if command == "ADD" else None
        if netns is None or not cni.is_netns(netns):
            raise CniError(cni.ERR_UNKNOWN_CONTAINER,
                           f"no network namespace at {environ.get('CNI_NETNS') or '(CNI_NETNS empty)'}")
        config = decision.config._replace(network_namespace=netns)
        log(f"{command}: capturing with {' '.join(decision.flags)}")
        try:
            problems = cni.core(command, config, call)
        except IstioInitError as exc:
            raise CniError(cni.ERR_APPLY, "installing the capture failed" if command == "ADD"
                           else "reading the namespace's rules failed", str(exc)) from None
        if problems:
            raise CniError(cni.ERR_DRIFT, "the capture rules differ from the pod's annotations", "; ".join(problems))
        return conf.prev_result if command == "ADD" else None
    if command == "DEL":
        # Like Istio's plugin, DEL changes nothing in the namespace: the runtime destroys it with
        # the sandbox (and a later ADD into the same namespace converges). Only the namespace's
        # lock file, which lives in the agent, goes.
        if netns is not None and cni.is_netns(netns):
            try:
                forget_lock(netns)
            except IstioInitError as exc:
                log(f"DEL: {exc}", "warn")
        return None
    return None  # STATUS: serving; GC: nothing of ours outlives a pod's namespace


def forget_lock(netns: str) -> None:
    """Remove istio-init's lock file of the namespace at `netns` (entering it names the file)."""
    from istio_init.host import locks, namespace

    namespace.enter(netns)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(locks.namespace_lock_path())


def _decide(request: Request, data: Any, mesh: MeshSettings, pod_facts: PodFactsSource) -> Any:
    try:
        runtime_config = data.get("runtimeConfig")
        return decide(pod_facts(request.environ.get("CNI_ARGS", ""), runtime_config), mesh)
    except AnnotationError as exc:
        raise CniError(cni.ERR_CONFIG, str(exc)) from None
    except PodLookupError as exc:
        raise CniError(cni.ERR_TRY_AGAIN, "the pod cannot be read from the API server", str(exc)) from None


def _no_flags(_: list[str]) -> dict[str, Any]:
    raise AssertionError("the agent decides from pod facts, never from configured args")


def serve_call(conn: socket.socket, options: AgentOptions, log: Log) -> None:
    """Read one request, answer it: exit status, newline, the JSON document (if any)."""
    try:
        request = read_request(conn)
    except (ProtocolError, OSError) as exc:
        log(f"dropped a connection: {exc}", "warn")
        return
    started = time.monotonic()
    code, document = cni.answer(request.environ.get("CNI_COMMAND", ""), request.stdin,
                                log, lambda data: respond(request, data, options.mesh, log, options.pod_facts))
    log(f"{request.environ.get('CNI_COMMAND', '?')}: answered {code} in {(time.monotonic() - started) * 1000:.1f} ms")
    reply = f"{code}\n".encode() + document
    with contextlib.suppress(OSError):
        conn.sendall(reply)


# ---- the agent ------------------------------------------------------------------------------------

class Agent:
    """The serving socket, the health endpoint and the installation they both depend on."""

    def __init__(self, options: AgentOptions, log: Log) -> None:
        self.options = options
        self.log = log
        self.socket_path = options.run_dir / SOCKET_NAME
        self.children: set[int] = set()
        self.stopping = False
        self.listener: socket.socket | None = None
        self.health: socket.socket | None = None
        self.socket_inode = 0

    # -- installation --
    def install(self) -> None:
        if cni_install.install_binary(self.options.plugin, self.options.cni_bin_dir):
            self.log(f"installed {self.options.cni_bin_dir / cni_install.PLUGIN_TYPE}")
        chained = cni_install.chain(self.options.cni_conf_dir, str(self.options.run_dir))
        if chained.path is None:
            self.log(f"no CNI configuration in {self.options.cni_conf_dir} yet; waiting for the primary CNI", "warn")
        elif chained.changed:
            self.log(f"chained {cni_install.PLUGIN_TYPE} into {chained.path}")

    def keep_installed(self) -> None:
        """install(), retried every second while the node's directories refuse (readyz says 503 meanwhile)."""
        try:
            self.install()
        except OSError as exc:
            self.log(f"cannot install into the node's CNI directories: {exc}", "error")

    def uninstall(self) -> None:
        for path in cni_install.unchain(self.options.cni_conf_dir):
            self.log(f"removed {cni_install.PLUGIN_TYPE} from {path}")
        cni_install.remove_binary(self.options.cni_bin_dir)
        self.log(f"removed {self.options.cni_bin_dir / cni_install.PLUGIN_TYPE}")

    def ready(self) -> bool:
        """Installed (binary, entry once and last) and serving (our socket at its path)."""
        try:
            serving = self.listener is not None and os.stat(self.socket_path).st_ino == self.socket_inode
        except OSError:
            serving = False
        binary = os.access(self.options.cni_bin_dir / cni_install.PLUGIN_TYPE, os.X_OK)
        return serving and binary and cni_install.is_chained(self.options.cni_conf_dir, str(self.options.run_dir))

    # -- sockets --
    def open(self) -> None:
        """The run dir's files, the agent's socket and the health port; one clear error if any fails."""
        run_dir = self.options.run_dir
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            excluded = "".join(f"{name}\n" for name in self.options.mesh.exclude_namespaces)
            cni_install.write_atomically(run_dir / EXCLUDED_NAME, excluded.encode())
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener = listener
            listener.bind(str(self.socket_path))
            os.chmod(self.socket_path, 0o600)
            listener.listen(256)
            self.socket_inode = os.stat(self.socket_path).st_ino
        except OSError as exc:
            raise IstioInitError(f"cannot serve in --run-dir {run_dir}: {exc.strerror or exc}") from None
        try:
            health = socket.socket(socket.AF_INET6 if ":" in self.options.health_address else socket.AF_INET)
            self.health = health
            health.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            health.bind((self.options.health_address, self.options.health_port))
            health.listen(16)
        except OSError as exc:
            raise IstioInitError(f"cannot listen on --health-port {self.options.health_port}: "
                                 f"{exc.strerror or exc}") from None
        self.log(f"serving {self.socket_path}; /readyz on port {health.getsockname()[1]}")

    def close(self) -> None:
        for sock in (self.listener, self.health):
            if sock is not None:
                sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.socket_path).st_ino == self.socket_inode:
                os.unlink(self.socket_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.options.run_dir / EXCLUDED_NAME)

    def answer_health(self) -> None:
        assert self.health is not None
        conn, _ = self.health.accept()
        with conn:
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                request = conn.recv(1024).decode("latin-1")
                path = request.split(" ")[1] if request.count(" ") >= 2 else ""
                if path == "/readyz":
                    ok = self.ready()
                    status, body = ("200 OK", "ok\n") if ok else ("503 Service Unavailable", "not installed\n")
                else:
                    status, body = "404 Not Found", "not found\n"
                conn.sendall(f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                             f"Connection: close\r\n\r\n{body}".encode())

    def fork_call(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        pid = os.fork()
        if pid == 0:  # the child: serve this one call, never return into the loop
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                for sock in (self.listener, self.health):
                    if sock is not None:
                        sock.close()
                serve_call(conn, self.options, self.log)
            except BaseException:  # noqa: BLE001 - the child must exit, whatever happened
                code = 1
            finally:
                os._exit(code)
        self.children.add(pid)
        conn.close()

    def reap(self) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            self.children.discard(pid)

    def serve(self) -> int:
        """Serve until SIGTERM or SIGINT; then uninstall and wait for calls in flight."""
        def stop(signum: int, _: Any) -> None:
            self.stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        warm()
        installed = False
        try:
            self.open()
            installed = True  # from here on, whatever happens, the node gets its files back
            self.keep_installed()
            selector = selectors.DefaultSelector()
            assert self.listener is not None and self.health is not None
            selector.register(self.listener, selectors.EVENT_READ, self.fork_call)
            selector.register(self.health, selectors.EVENT_READ, self.answer_health)
            next_check = time.monotonic() + WATCH_INTERVAL
            while not self.stopping:
                for key, _ in selector.select(timeout=max(0.0, next_check - time.monotonic())):
                    key.data()
                self.reap()
                if time.monotonic() >= next_check:
                    self.keep_installed()  # undoes a rewrite of the primary file, puts back a removed binary
                    next_check = time.monotonic() + WATCH_INTERVAL
            self.log("stopping: removing the plugin from the node")
        finally:
            if installed:
                self.uninstall()
            self.close()
            deadline = time.monotonic() + CHILD_WAIT_SECONDS
            while self.children and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.05)
        return 0


def warm() -> None:
    """Import what a call needs and decide and plan one pod, once: every forked child starts with
    the modules loaded and the parsers' regular expressions compiled."""
    import importlib

    from istio_init.podcapture import PodFacts
    from istio_init.iptables_save.write import render_plan
    from istio_init.rulesets import plan

    for name in _WARM_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    sample = decide(PodFacts("default", "warm-up", {"sidecar.istio.io/status": "{}"}), MeshSettings())
    if isinstance(sample, Capture):
        render_plan(plan(sample.config, False))
