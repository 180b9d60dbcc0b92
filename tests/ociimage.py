"""One-layer OCI image-layout tars, for importing into containerd with `ctr images import`.

No registry is involved: the layer is a tar made here, and the index names
the image (`io.containerd.image.name`), which makes it visible to the CRI
plugin at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Layer:
    """Files, directories and symlinks of the one layer."""

    files: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # path -> (content, mode)
    dirs: dict[str, int] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, mode in sorted(self.dirs.items()):
                info = tarfile.TarInfo(path)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            for path, target in sorted(self.links.items()):
                info = tarfile.TarInfo(path)
                info.type, info.linkname = tarfile.SYMTYPE, target
                tar.addfile(info)
            for path, (content, mode) in sorted(self.files.items()):
                info = tarfile.TarInfo(path)
                info.size, info.mode = len(content), mode
                tar.addfile(info, io.BytesIO(content))
        return out.getvalue()


def _blob(blobs: dict[str, bytes], data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest, len(data)


def image_tar(name: str, layer: Layer, entrypoint: list[str], out: Path, user: str = "") -> Path:
    """Write the image `name` (e.g. localhost/pause:test) as an OCI image-layout tar at `out`."""
    blobs: dict[str, bytes] = {}
    layer_digest, layer_size = _blob(blobs, layer.tar())
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": entrypoint, "User": user, "Env": ["PATH=/usr/bin:/bin"]},
              "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
    config_digest, config_size = _blob(blobs, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                           "size": config_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                            "size": layer_size}]}
    manifest_digest, manifest_size = _blob(blobs, json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
         "size": manifest_size, "annotations": {"io.containerd.image.name": name,
                                                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}]}
    with tarfile.open(out, "w") as tar:
        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
    return out
