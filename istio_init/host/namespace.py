"""The network namespace this process works in: entering another, whether it is the host's own, and
whether this process may change it.
"""

from __future__ import annotations

import errno
import os

from istio_init.errors import ConfigError, IstioInitError

_CLONE_NEWNET = 0x40000000  # linux/sched.h
_CAP_NET_ADMIN = 12  # linux/capability.h
# The kernel's fixed inode number of the initial PID namespace (PROC_PID_INIT_INO in
# include/linux/proc_ns.h). Network namespaces have no fixed number, so the host's is
# recognised as the one pid 1 of the initial PID namespace is in.
_INITIAL_PID_NAMESPACE_INODE = 0xEFFFFFFC


def has_net_admin() -> bool | None:
    """Whether this process holds CAP_NET_ADMIN (None: cannot tell; let the kernel decide)."""
    try:
        with open("/proc/self/status") as status:
            line = next(ln for ln in status if ln.startswith("CapEff:"))
    except (OSError, StopIteration):
        return None
    return bool(int(line.split()[1], 16) & (1 << _CAP_NET_ADMIN))


def in_initial_namespace() -> bool:
    """Whether this process is in the host's own network namespace (pid 1's, seen from the host).

    In a pod, pid 1 is the pod's own first process and /proc shows the pod's PID
    namespace, so this is False there; it is True for a bare `istio-init` in a
    root shell on a node, which would redirect the node's own traffic.
    """
    try:
        if os.stat("/proc/self/ns/pid").st_ino != _INITIAL_PID_NAMESPACE_INODE:
            return False
        ours, init = os.stat("/proc/self/ns/net"), os.stat("/proc/1/ns/net")
    except OSError:  # no /proc, or pid 1's namespace may not be looked at: cannot tell
        return False
    return (ours.st_dev, ours.st_ino) == (init.st_dev, init.st_ino)


def enter(path: str, label: str = "--network-namespace") -> None:
    """Move this process (single-threaded) into the network namespace at `path`.

    `label` names the flag and, when the value came from it, the variable. A
    path that is missing or not a network namespace is the user's mistake (exit
    2); a refusal for want of privilege is not.
    """
    import ctypes

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise IstioInitError(f"{label} {path}: {exc.strerror}") from None
        raise ConfigError(label, path, exc.strerror or "cannot open") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            if err == errno.EINVAL:
                raise ConfigError(label, path, "not a network namespace")
            raise IstioInitError(f"{label} {path}: cannot enter: {os.strerror(err)}")
    finally:
        os.close(fd)
