"""Shared fixtures: a fresh network namespace per test, the root marker, and the kube node.

Tests that change kernel state run only as root (CI is root); elsewhere they
skip with a reason. Namespaces are named, created with pyroute2 and removed
after the test whatever happens, so `ip netns list` stays empty.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Iterator

import pytest

from nsutil import Namespace

IS_ROOT = os.geteuid() == 0

# istio-init keeps one lock file per network namespace in /run/istio-init. The tests make thousands
# of namespaces: their runs (in this process and every child) lock in a directory of the session's
# own instead, removed when the session ends, so the machine's /run/istio-init is left as it was.
_SESSION_LOCK_DIR = tempfile.mkdtemp(prefix="istio-init-test-locks-")
os.environ.setdefault("ISTIO_INIT_LOCK_DIR", _SESSION_LOCK_DIR)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SESSION_LOCK_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces (run as root, or scripts/test-in-docker)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def netns() -> Iterator[Namespace]:
    """A fresh, empty network namespace (loopback up), removed afterwards."""
    ns = Namespace.create()
    try:
        yield ns
    finally:
        ns.remove()


@pytest.fixture(scope="module")
def module_netns() -> Iterator[Namespace]:
    """One namespace for all of a module's examples (property tests that load rules into the kernel), removed
    at the end; each example leaves it as it found it. For tests marked root."""
    ns = Namespace.create()
    try:
        yield ns
    finally:
        ns.remove()


@pytest.fixture
def pod() -> Iterator[Namespace]:
    """A fresh pod namespace (pod0 at 192.0.2.10/24, hostile.py), removed afterwards."""
    from hostile import pod_namespaces

    yield from pod_namespaces("pod")


# What the kube tests measured, printed at the end of the run (docs/kubernetes-node.md's figures).
KUBE_TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if KUBE_TIMINGS:
        terminalreporter.write_line("kube: " + ", ".join(f"{k} {v:.1f}s" for k, v in KUBE_TIMINGS.items()))


@pytest.fixture(scope="session")
def kube_node() -> Iterator[Any]:
    """A single-node cluster (tests/kubenode.py) for the whole run, removed afterwards.

    Skips with the reason when this machine cannot run one (not root, binaries or packages
    missing: scripts/ci-kube builds and installs them). Nodes left by a killed run are removed
    first."""
    if not IS_ROOT:
        pytest.skip("needs root for the node's namespaces, mounts and cgroups")
    if os.environ.get("ISTIO_INIT_KUBE") != "1":
        pytest.skip("the Kubernetes node tests run in scripts/ci-kube (ISTIO_INIT_KUBE=1 runs them here)")
    import kubenode

    missing = kubenode.missing_parts()
    if missing:
        pytest.skip("no Kubernetes node can run here; missing: " + "; ".join(missing))
    kubenode.cleanup_stale()
    node = kubenode.start_node(owner=os.getpid())
    KUBE_TIMINGS["node Ready"] = node.timings["node_ready"]
    try:
        yield node
    finally:
        left = kubenode.stop(node)
        assert not left, f"the node left behind: {left}"


# variant -> the image of this project scripts/ci-kube builds for it (scripts/build-image).
KUBE_ISTIO_IMAGES = {"1.8": os.environ.get("ISTIO_INIT_IMAGE", "istio-init:dev"),
                     "current": os.environ.get("ISTIO_INIT_CURRENT_IMAGE", "istio-init:current")}


@pytest.fixture(scope="session")
def kube_images(kube_node: Any) -> dict[str, str]:
    """This project's images (`docker save` from the Docker engine) imported into the node."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client to `docker save` the istio-init images (scripts/ci-kube builds them)")
    loaded: dict[str, str] = {}
    for variant, image in KUBE_ISTIO_IMAGES.items():
        tar = kube_node.work / "images" / (image.replace(":", "_").replace("/", "_") + ".tar")
        begin = time.monotonic()
        try:
            saved = subprocess.run(["docker", "save", "-o", str(tar), image], capture_output=True, text=True,
                                   timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`docker save {image}` timed out")
        if saved.returncode != 0:
            pytest.skip(f"image {image} cannot be saved ({saved.stderr.strip()}); build it: scripts/ci-kube")
        kube_node.import_image(tar)
        tar.unlink()
        KUBE_TIMINGS[f"image {image} imported"] = time.monotonic() - begin
        loaded[variant] = image
    return loaded
