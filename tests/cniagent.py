"""The CNI form's agent and host plugin for tests: build the plugin once, run the agent as a process.

The agent runs as `istio-init cni-agent` with the fixed command line the
DaemonSet uses, in the machine's network namespace (a DaemonSet pod with the
host network), on a bin dir, conf dir and run dir of the test. It is stopped
by its pid (SIGTERM, as the kubelet does), and killed if it overruns.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
AGENT = [str(Path(sys.executable).with_name("istio-init")), "cni-agent"]
_built: dict[str, Path] = {}


def build_plugin(directory: Path) -> Path:
    """scripts/build-cni-plugin, once per test session (the binary is reused)."""
    if "plugin" not in _built:
        out = directory / "istio-init-cni"
        subprocess.run([str(ROOT / "scripts" / "build-cni-plugin"), str(out)], check=True, timeout=120,
                       capture_output=True)
        _built["plugin"] = out
    return _built["plugin"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class AgentDirs:
    """The node's directories as the agent sees them."""

    bin_dir: Path
    conf_dir: Path
    run_dir: Path

    @classmethod
    def under(cls, base: Path) -> "AgentDirs":
        dirs = cls(base / "bin", base / "net.d", base / "run")
        for path in (dirs.bin_dir, dirs.conf_dir):
            path.mkdir(parents=True, exist_ok=True)
        return dirs


@dataclass
class AgentProcess:
    """A running `istio-init cni-agent`."""

    process: subprocess.Popen
    dirs: AgentDirs
    health_port: int
    log: Path
    extra: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, plugin: Path, dirs: AgentDirs, log: Path, args: list[str] | None = None,
              env: dict[str, str] | None = None, prefix: list[str] | None = None) -> "AgentProcess":
        port = free_port()
        argv = [*(prefix or []), *AGENT, "--plugin", str(plugin), "--cni-bin-dir", str(dirs.bin_dir),
                "--cni-conf-dir", str(dirs.conf_dir), "--run-dir", str(dirs.run_dir),
                "--health-port", str(port), *(args or [])]
        with log.open("ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=out, env={**os.environ, **(env or {})})
        agent = cls(process, dirs, port, log)
        agent.wait_ready()
        return agent

    def readyz(self) -> int:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.health_port, timeout=2)
            conn.request("GET", "/readyz")
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            return 0

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the agent exited {self.process.returncode}: {self.log.read_text()[-2000:]}")
            if self.readyz() == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the agent was not ready in {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


def primary_plugins(conf_dir: Path) -> list[dict[str, Any]]:
    """The plugins of the first configuration file, as the runtime would load them."""
    files = sorted(p for p in conf_dir.iterdir() if p.suffix in (".conf", ".conflist", ".json")
                   and not p.name.startswith("."))
    data = json.loads(files[0].read_text())
    return data["plugins"] if "plugins" in data else [data]
