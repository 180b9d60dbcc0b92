"""`--run-validation`: prove, with a real connection, that the rules redirect traffic.

This does what Istio's `tools/istio-iptables/pkg/validation` does, for the same
reason: rules that look right can still fail to move a packet (a missing
kernel module, a second tool flushing the table, a CNI that never ran), and
an init container that exits 0 over broken capture lets the application run
unmeshed. Istio's check, which this follows:

- listen on loopback (127.0.0.1, or ::1 for IPv6) at the outbound and inbound
  capture ports (-p, -z): these are the ports the rules send traffic to;
- from 127.0.0.1 (::1), connect to 127.0.0.6:<--iptables-probe-port> (::6);
  nothing listens there, so the connection only succeeds if a rule redirected it;
- succeed when one of the listeners accepts a connection whose original
  destination port (SO_ORIGINAL_DST) is the probe port; retry until
  --probe-timeout, then fail (exit 126, as Istio).

The probe connects as the proxy uid/gid (the first of -u and -g), not as the
current user. That is forced by the rules themselves: for a non-proxy uid,
`-o lo -m owner ! --uid-owner U -j RETURN` leaves every connection over `lo`
alone, so a loopback probe from root could never be redirected, and a probe to
a non-local address would depend on -i (empty -i captures nothing outbound).
The proxy's own `lo` traffic to a non-127.0.0.1 address is always sent to
ISTIO_IN_REDIRECT, whatever the other flags say; Istio's validation container
runs as the proxy uid for exactly this reason. The probe is made from a forked
child that drops to that uid/gid, so the rest of istio-init keeps its
privileges. With IPv6 rules both families are probed, within one timeout.

With --skip-rule-apply nothing is installed first, so this checks rules that
somebody else (a CNI plugin, an earlier run) put in place.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from istio_init.config import Config
from istio_init.errors import ValidationError

SO_ORIGINAL_DST = 80  # SOL_IP, linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # SOL_IPV6, linux/netfilter_ipv6/ip6_tables.h
_RETRY_PAUSE = 0.1
_CONNECT_TIMEOUT = 1.0


@dataclass(frozen=True)
class Probe:
    """The addresses of one family's check."""

    family: int
    listen: str  # where the stand-in listeners bind
    client: str  # the probe's source address
    target: str  # the address the probe connects to; nothing listens there

    @property
    def af(self) -> int:
        return socket.AF_INET if self.family == 4 else socket.AF_INET6


PROBES = {4: Probe(4, "127.0.0.1", "127.0.0.1", "127.0.0.6"), 6: Probe(6, "::1", "::1", "::6")}


def _original_port(conn: socket.socket) -> int | None:
    try:
        if conn.family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            return int(struct.unpack_from("!2xH", raw)[0])
        raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        return int(struct.unpack_from("!2xH", raw)[0])
    except OSError:
        return None


def _listeners(probe: Probe, ports: list[int]) -> tuple[list[socket.socket], list[str]]:
    socks, problems = [], []
    for port in ports:
        sock = socket.socket(probe.af, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((probe.listen, port))
            sock.listen(16)
            sock.setblocking(False)
            socks.append(sock)
        except OSError as exc:
            sock.close()
            problems.append(f"cannot listen on {_join(probe.listen, port)}: {exc.strerror}")
    return socks, problems


def _join(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _switch_user(uid: int, gid: int) -> None:
    if os.getuid() == uid and os.getgid() == gid:
        return
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _connect_as(probe: Probe, port: int, uid: int, gid: int) -> str:
    """One probe connection from a child running as uid/gid; '' on connect, else what went wrong."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the caller's code
        status = 1
        try:
            os.close(read_end)
            try:
                _switch_user(uid, gid)
            except OSError as exc:
                os.write(write_end, f"cannot switch to uid {uid} gid {gid}: {exc.strerror}".encode())
                raise
            with socket.socket(probe.af, socket.SOCK_STREAM) as sock:
                sock.settimeout(_CONNECT_TIMEOUT)
                sock.bind((probe.client, 0))
                try:
                    # The handshake completing is enough: the listener accepts it from its backlog.
                    sock.connect((probe.target, port))
                    status = 0
                except OSError as exc:
                    reason = errno.errorcode.get(exc.errno or 0, "") if exc.errno else "timeout"
                    os.write(write_end, f"{reason}: {exc.strerror or exc}".encode())
        except BaseException:  # noqa: BLE001 - the child must exit, whatever happened
            pass
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        chunks = []
        while True:  # bounded: the child writes one short message and exits
            chunk = os.read(read_end, 512)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


def _accept_probe(listeners: list[socket.socket], port: int, wait: float) -> tuple[str, list[str]]:
    """Accept what arrived; the listener's address if a connection's original port is the probe port."""
    seen: list[str] = []
    ready, _, _ = select.select(listeners, [], [], wait)
    for listener in ready:
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        with conn:
            conn.settimeout(_CONNECT_TIMEOUT)
            original = _original_port(conn)
            try:
                conn.sendall(str(original).encode())
            except OSError:
                pass
        if original == port:
            return _join(*listener.getsockname()[:2]), seen
        seen.append(f"a connection reached {_join(*listener.getsockname()[:2])} with original port {original}")
    return "", seen


def probe_family(config: Config, probe: Probe, deadline: float) -> str:
    """Run one family's check until it passes (returns a one-line success) or the deadline passes."""
    capture_ports = list(dict.fromkeys([config.envoy_port, config.inbound_capture_port]))
    uid, gid = config.proxy_uids[0], config.proxy_gids[0]
    target = _join(probe.target, config.iptables_probe_port)
    expected = (f"expected a connection from {probe.client} to {target} as uid {uid} gid {gid} to be "
                f"redirected to {' or '.join(_join(probe.listen, p) for p in capture_ports)} "
                f"within {config.probe_timeout:g}s")
    listeners, problems = _listeners(probe, capture_ports)
    if not listeners:
        raise ValidationError(f"validation failed (IPv{probe.family}): {expected}; instead: "
                              + "; ".join(problems))
    last = "no attempt was made"
    try:
        attempts = 0
        while True:
            attempts += 1
            outcome = _connect_as(probe, config.iptables_probe_port, uid, gid)
            reached, seen = _accept_probe(listeners, config.iptables_probe_port, 0.5 if not outcome else 0)
            if reached:
                return f"IPv{probe.family}: {target} was redirected to {reached} after {attempts} attempt(s)"
            if outcome.startswith("cannot switch"):
                last = outcome
                break
            if outcome.startswith("ECONNREFUSED"):
                last = f"{target} refused the connection, so no rule redirected it (are the rules installed?)"
            elif outcome:
                last = f"connecting to {target} failed: {outcome}"
            elif seen:
                last = "; ".join(seen)
            else:
                last = f"the connection to {target} was accepted, but not by the validation listeners"
            if time.monotonic() + _RETRY_PAUSE >= deadline:
                break
            time.sleep(_RETRY_PAUSE)
    finally:
        for sock in listeners:
            sock.close()
    raise ValidationError(f"validation failed (IPv{probe.family}): {expected}; instead, after {attempts} "
                          f"attempt(s): {last}")


def probe_families(config: Config, ipv6: bool) -> list[str]:
    """Check IPv4 (and IPv6 when the pod has IPv6 rules) in the current namespace; raise on failure.

    Returns one success line per family, for the CLI to log.
    """
    deadline = time.monotonic() + config.probe_timeout
    return [probe_family(config, PROBES[family], deadline) for family in ((4, 6) if ipv6 else (4,))]
