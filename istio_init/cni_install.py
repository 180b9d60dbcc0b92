"""Putting the host plugin on the node and chaining it into the primary CNI configuration.

The container runtime (containerd, CRI-O) loads the lexicographically first
valid `.conf`, `.conflist` or `.json` file of its CNI configuration directory
and runs its plugins in order. So the agent appends one `istio-init-cni` entry,
as the last plugin, to exactly that file, and keeps it there: never twice
(istio#27771), back within seconds when the primary CNI rewrites its file
(istio#11037, cilium#26760), and removed again, with the binary, when the
agent stops (istio#20238: a node must not be left unable to start pods).
Every write is a rename of a complete file, so the runtime never reads half.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from istio_init.podcapture import ANNOTATIONS_CAPABILITY

PLUGIN_TYPE = "istio-init-cni"
CONF_SUFFIXES = (".conf", ".conflist", ".json")  # the extensions libcni reads


@dataclass(frozen=True)
class Chained:
    """Where the entry is (the primary file) and whether this call changed anything."""

    path: Path | None
    changed: bool


def plugin_entry(run_dir: str) -> dict[str, Any]:
    """Our entry: the capability makes the runtime pass the pod's annotations in runtimeConfig."""
    return {"type": PLUGIN_TYPE, "name": PLUGIN_TYPE, "capabilities": {ANNOTATIONS_CAPABILITY: True},
            "runDir": run_dir}


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` by a complete new file (a dot-name temporary in the same directory, then rename)."""
    temporary = path.with_name(f".{path.name}.istio-init-{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as out:
            out.write(data)
            out.flush()
            os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def install_binary(plugin: Path, bin_dir: Path) -> bool:
    """Copy the plugin into the CNI bin dir as `istio-init-cni`; False when it is already there."""
    target = bin_dir / PLUGIN_TYPE
    data = plugin.read_bytes()
    with contextlib.suppress(OSError):
        if target.read_bytes() == data and os.access(target, os.X_OK):
            return False
    bin_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(target, data, 0o755)
    return True


def remove_binary(bin_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(bin_dir / PLUGIN_TYPE)


def _load(path: Path) -> dict[str, Any] | None:
    """The configuration in `path` when it is one the runtime would accept, else None."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if path.suffix == ".conflist":
        plugins = data.get("plugins")
        return data if isinstance(plugins, list) and plugins and all(isinstance(p, dict) for p in plugins) else None
    return data if isinstance(data.get("type"), str) else None


def conf_files(conf_dir: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(conf_dir))
    except FileNotFoundError:
        return []
    return [conf_dir / name for name in names if name.endswith(CONF_SUFFIXES) and not name.startswith(".")]


def primary(conf_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The file the runtime uses: the first valid one in lexicographic order."""
    for path in conf_files(conf_dir):
        data = _load(path)
        if data is not None:
            return path, data
    return None


def _as_list(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    if path.suffix == ".conflist":
        return data
    single = {k: v for k, v in data.items() if k != "cniVersion"}
    return {"cniVersion": data.get("cniVersion", "1.0.0"), "name": data.get("name", path.stem), "plugins": [single]}


def _ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def _dump(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def chain(conf_dir: Path, run_dir: str) -> Chained:
    """Make our entry the last plugin of the primary configuration, exactly once.

    A `.conf` (one plugin) becomes a `.conflist` of the same stem, which the
    runtime picks in its place.
    """
    found = primary(conf_dir)
    if found is None:
        return Chained(None, False)
    path, data = found
    listed = _as_list(path, data)
    plugins = [p for p in listed["plugins"] if not _ours(p)] + [plugin_entry(run_dir)]
    wanted = {**listed, "plugins": plugins}
    if path.suffix == ".conflist" and wanted == data:
        return Chained(path, False)
    target = path if path.suffix == ".conflist" else path.with_suffix(".conflist")
    write_atomically(target, _dump(wanted))
    if target != path:
        os.unlink(path)
    return Chained(target, True)


def is_chained(conf_dir: Path, run_dir: str) -> bool:
    found = primary(conf_dir)
    if found is None or found[0].suffix != ".conflist":
        return False
    plugins = found[1]["plugins"]
    return sum(map(_ours, plugins)) == 1 and plugins[-1] == plugin_entry(run_dir)


def unchain(conf_dir: Path) -> list[Path]:
    """Remove our entries from every configuration file; returns the files changed."""
    changed = []
    for path in conf_files(conf_dir):
        data = _load(path)
        if data is None or path.suffix != ".conflist" or not any(map(_ours, data["plugins"])):
            continue
        kept = [p for p in data["plugins"] if not _ours(p)]
        if kept:
            write_atomically(path, _dump({**data, "plugins": kept}))
        else:
            os.unlink(path)
        changed.append(path)
    return changed

