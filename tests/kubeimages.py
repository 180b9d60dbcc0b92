"""The kube tests' own images, as one-layer OCI image-layout tars containerd imports without a registry.

- `localhost/iik-pause:1`: the pod sandbox (tests/kube-src/pause.c, built static).
- `localhost/iik-test:1`: Debian's busybox-static (sh, sleep, cat, ...) and origdst
  (tests/kube-src/origdst.c): `origdst serve LABEL PORT...` is the app or, as uid 1337 on 15001
  and 15006, the proxy stand-in reporting each connection's original destination;
  `origdst connect HOST PORT` is the client.

The C programs are compiled with gcc -static; the layer is made with fixed owners and times, so
the same sources give the same image digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

SRC = Path(__file__).parent / "kube-src"
BUSYBOX = Path("/bin/busybox")
PAUSE_IMAGE = "localhost/iik-pause:1"
TEST_IMAGE = "localhost/iik-test:1"
BUSYBOX_LINKS = ("sh", "sleep", "cat", "ls", "echo", "nc", "id", "true", "false", "ps", "kill")


def _compile(source: Path, out: Path) -> bytes:
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    return out.read_bytes()


def _layer(files: dict[str, bytes], links: dict[str, str]) -> bytes:
    """A gzip-compressed tar of the given files (mode 0755) and symlinks, owned by root."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({"/".join(path.split("/")[:i]) for path in [*files, *links]
                       for i in range(1, path.count("/") + 1)} | {"tmp"})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
        for path, target in sorted(links.items()):
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return raw.getvalue()


def _oci_tar(out: Path, name: str, layer: bytes, entrypoint: list[str] | None, cmd: list[str] | None) -> Path:
    compressed = gzip.compress(layer, mtime=0)
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin"], "Entrypoint": entrypoint, "Cmd": cmd, "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]}}
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> dict[str, object]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": f"sha256:{digest}", "size": len(data)}

    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(config_bytes)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(compressed)}]}
    manifest_ref = blob(json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_ref,
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}}]}
    with tarfile.open(out, "w") as tar:
        entries = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
                   "index.json": json.dumps(index, sort_keys=True).encode(),
                   **{f"blobs/sha256/{digest}": data for digest, data in blobs.items()}}
        for path, data in entries.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out


def build(out_dir: Path) -> list[Path]:
    """Both test images as OCI tars in out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pause = _compile(SRC / "pause.c", out_dir / "pause")
    origdst = _compile(SRC / "origdst.c", out_dir / "origdst")
    busybox = BUSYBOX.read_bytes()
    return [
        _oci_tar(out_dir / "iik-pause.tar", PAUSE_IMAGE, _layer({"pause": pause}, {}), ["/pause"], None),
        _oci_tar(out_dir / "iik-test.tar", TEST_IMAGE,
                 _layer({"bin/busybox": busybox, "bin/origdst": origdst},
                        {f"bin/{tool}": "busybox" for tool in BUSYBOX_LINKS}),
                 None, ["/bin/sleep", "3600"]),
    ]
