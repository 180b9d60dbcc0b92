"""Shared fixtures: a fresh network namespace per test, and the root marker.

Tests that change kernel state run only as root (CI is root); elsewhere they
skip with a reason. Namespaces are named, created with pyroute2 and removed
after the test whatever happens, so `ip netns list` stays empty.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from nsutil import Namespace

IS_ROOT = os.geteuid() == 0


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


@pytest.fixture
def pod() -> Iterator[Namespace]:
    """A fresh pod namespace (pod0 at 192.0.2.10/24, hostile.py), removed afterwards."""
    from hostile import pod_namespace

    ns = pod_namespace("pod")
    try:
        yield ns
    finally:
        ns.remove()
