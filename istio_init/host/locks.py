"""Waiting for an flock-style lock file, as `iptables -w` does, and istio-init's lock per namespace.

Two locks use it: istio-init's own (read, decide and commit must not
interleave with another run in the same network namespace) and the xtables
lock every iptables binary takes (python-iptables does not take it itself).
istio-init's lock is one file per network namespace, named by the
namespace's inode, so two pods' applies from one node (a CNI plugin's
parallel ADDs) never wait for each other, while two applies into one
namespace always do. The directory is world-writable and sticky like /tmp,
and a lock can be taken through a read-only descriptor, so a process with
NET_ADMIN but without root (a validation or CNI case) can take it too.

A lock file may be removed (the CNI plugin's DEL removes the pod's, so the
directory does not grow by a file per pod for the node's lifetime), and one
namespace must still map to one lock for as long as anyone can hold it. So a
file is only ever unlinked by a process that holds its lock (`retire`), and
whoever takes a lock checks, once it holds it, that the path still names the
very file it locked; if not (it had opened the file before it was retired),
it lets go and takes the lock on the path's new file. A holder of a lock is
thus always the holder of the file the path names.
"""

from __future__ import annotations

import fcntl
import os
import time

from istio_init.errors import ApplyError

LOCK_DIR = "/run/istio-init"
LOCK_WAIT_SECONDS = 60


def namespace_lock_path() -> str:
    """The lock file of the network namespace this process is in ($ISTIO_INIT_LOCKFILE overrides)."""
    override = os.environ.get("ISTIO_INIT_LOCKFILE")
    if override:
        return override
    directory = os.environ.get("ISTIO_INIT_LOCK_DIR") or LOCK_DIR
    stat = os.stat("/proc/self/ns/net")
    return os.path.join(directory, f"netns-{stat.st_dev}-{stat.st_ino}.lock")


def _open(path: str, make_dir: bool) -> int:
    directory = os.path.dirname(path)
    if make_dir and not os.path.isdir(directory):
        try:
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o1777)  # sticky and world-writable, as /tmp
        except FileExistsError:
            pass
    # Read-only is enough for flock, and the only way to open a network namespace
    # file, which --cni-mode uses as the pod's xtables lock (as iptables does).
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileExistsError:  # made by a concurrent run in between
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _still_named(fd: int, path: str) -> bool:
    """Whether `path` still names the file open at `fd` (it was not retired meanwhile)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _take(path: str, timeout: float, holder: str, make_dir: bool) -> int:
    """An open descriptor of the file `path` names, holding its exclusive lock."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = _open(path, make_dir)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ApplyError(f"cannot open the lock file {path}: {reason} (nothing was changed)") from None
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ApplyError(f"{holder} held {path} for {timeout:g}s (nothing was changed)") from None
                    time.sleep(0.01)
            if _still_named(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # retired while we waited: take the lock of the path's file now


class held:
    """Hold the exclusive lock on `path` (a `with` block), polling up to `timeout` seconds for it.

    `holder` says who is waited for, in the error: "another istio-init run".
    A class, not a contextlib.contextmanager: contextlib and what it imports
    are start-up time of every apply (docs/performance.md, "What start-up avoids").
    """

    def __init__(self, path: str, timeout: float, holder: str, make_dir: bool = False) -> None:
        self.path, self.timeout, self.holder, self.make_dir = path, timeout, holder, make_dir
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = _take(self.path, self.timeout, self.holder, self.make_dir)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def retire(path: str, timeout: float = LOCK_WAIT_SECONDS) -> None:
    """Remove the lock file at `path`, holding its lock while it is unlinked (see the module's docstring)."""
    if not os.path.exists(path):
        return
    with held(path, timeout, "another istio-init run"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def namespace_lock(timeout: float = LOCK_WAIT_SECONDS) -> held:
    """One istio-init run at a time per network namespace: read, decide and commit must not interleave."""
    path = namespace_lock_path()
    return held(path, timeout, "another istio-init run", make_dir=not os.environ.get("ISTIO_INIT_LOCKFILE"))


def retire_namespace_lock() -> None:
    """The pod's namespace is going (CNI DEL): its lock file goes too, under its own lock."""
    if not os.environ.get("ISTIO_INIT_LOCKFILE"):  # a file given by the caller is the caller's
        retire(namespace_lock_path())
