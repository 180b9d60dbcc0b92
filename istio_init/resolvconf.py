"""The pod's DNS resolvers: the `nameserver` lines of its /etc/resolv.conf.

Current Istio captures DNS only to these addresses (unless --capture-all-dns),
so that a local DNS proxy's own upstream queries do not loop back to the
agent. Read here, not in the planner, so the planner stays pure; the path can
be pointed elsewhere (ISTIO_INIT_RESOLV_CONF) for tests and for runs from the
host on behalf of a pod.
"""

from __future__ import annotations

import ipaddress
import os
import stat

PATH_ENV = "ISTIO_INIT_RESOLV_CONF"
DEFAULT_PATH = "/etc/resolv.conf"
# A resolv.conf is a few hundred bytes; glibc reads at most three nameservers from it. Reading is
# bounded so that a pod's file (it is the pod's, not ours) can never hold up or exhaust the run.
MAX_BYTES = 65536


def path() -> str:
    return os.environ.get(PATH_ENV) or DEFAULT_PATH


def nameservers(text: str) -> list[str]:
    """The nameserver addresses in file order; lines that are not an IP address are skipped.

    A scoped IPv6 address (`fe80::1%eth0`) cannot be written as an iptables
    match, so it is skipped too, as is anything after the address.
    """
    found = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver" or "%" in words[1]:
            continue
        try:
            found.append(str(ipaddress.ip_address(words[1])))
        except ValueError:
            continue
    return found


def read(file: str | None = None) -> tuple[list[str], str | None]:
    """(resolvers, problem): the problem says why there are none, when there are none.

    Only a regular file is read, opened without blocking (a FIFO with no
    writer would wait forever), and at most MAX_BYTES of it (/dev/zero, or a
    huge file, would read until memory ran out).
    """
    file = file or path()
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return [], f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}"
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            return [], f"{file} is not a regular file ({_kind(kind)})"
        data = os.read(fd, MAX_BYTES + 1)
    except OSError as exc:
        return [], f"cannot read {file}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        return [], f"{file} is larger than {MAX_BYTES} bytes, which no resolv.conf is"
    servers = nameservers(data.decode("utf-8", errors="replace"))
    return servers, None if servers else f"{file} lists no nameserver"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"
