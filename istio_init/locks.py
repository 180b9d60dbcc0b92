"""Waiting for an flock-style lock file, as `iptables -w` does.

Two locks use it: istio-init's own (read, decide and commit must not
interleave with another run in the same node) and the xtables lock every
iptables binary takes (python-iptables does not take it itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import Iterator

from istio_init.errors import ApplyError


@contextlib.contextmanager
def held(path: str, timeout: float, holder: str) -> Iterator[None]:
    """Hold the exclusive lock on `path`, polling up to `timeout` seconds for it.

    `holder` says who is waited for, in the error: "another istio-init run".
    """
    try:
        # Read-only is enough for flock, and the only way to open a network namespace
        # file, which --cni-mode uses as the pod's xtables lock (as iptables does).
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ApplyError(f"cannot open the lock file {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ApplyError(f"{holder} held {path} for {timeout:g}s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)
