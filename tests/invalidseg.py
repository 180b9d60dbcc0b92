"""Helper program for the --drop-invalid wire proof: an out-of-window TCP segment, and who answers it.

`python invalidseg.py hold --port P` (in the pod) accepts one connection and
keeps it open. `python invalidseg.py probe --dst IP --port P` (in the peer)
opens that connection, learns both initial sequence numbers from the SYN-ACK
(a raw socket sees every TCP packet arriving in its namespace), sends one data
segment on the connection's 4-tuple with a sequence number 2^30 beyond the
window, and counts the pure ACKs the pod sends back within a second. A TCP
stack answers an unacceptable segment with an ACK (RFC 793), so one ACK means
the segment reached the pod's socket; none means it was dropped on the way
(conntrack marks it INVALID; --drop-invalid's mangle rule drops it). Prints
`{"acks": N}`. Every socket has a timeout and every loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

HOLD_SECONDS = 30.0
LISTEN_WINDOW = 1.0
OUT_OF_WINDOW = 1 << 30
ACK, SYN, PSH = 0x10, 0x02, 0x08


def hold(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", port))
        server.listen(4)
        server.settimeout(HOLD_SECONDS)
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(HOLD_SECONDS)
            deadline = time.monotonic() + HOLD_SECONDS
            while time.monotonic() < deadline:
                try:
                    if not conn.recv(4096):
                        return
                except OSError:
                    return


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _segment(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, payload: bytes) -> bytes:
    header = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4,
                         ACK | PSH, 65535, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP,
                                                                         len(header) + len(payload))
    checksum = _checksum(pseudo + header + payload)
    return header[:16] + struct.pack("!H", checksum) + header[18:] + payload


def _packets(raw: socket.socket, src: str, sport: int, dport: int, until: float):
    """(seq, ack, flags, payload length) of TCP packets src:sport -> *:dport until `until`."""
    for _ in range(10000):  # bounded
        remaining = until - time.monotonic()
        if remaining <= 0:
            return
        raw.settimeout(remaining)
        try:
            packet = raw.recv(65535)
        except socket.timeout:
            return
        ihl = (packet[0] & 0x0F) * 4
        if socket.inet_ntoa(packet[12:16]) != src:
            continue
        psrc, pdst, seq, ack, offset, flags = struct.unpack_from("!HHIIBB", packet, ihl)
        if (psrc, pdst) == (sport, dport):
            yield seq, ack, flags, len(packet) - ihl - (offset >> 4) * 4


def probe(dst: str, port: int) -> dict[str, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
        conn.settimeout(3.0)
        conn.connect((dst, port))
        local, client_port = conn.getsockname()
        synack = next((p for p in _packets(raw, dst, port, client_port, time.monotonic() + 2.0)
                       if p[2] & (SYN | ACK) == SYN | ACK), None)
        if synack is None:
            return {"error": 1, "acks": -1}
        server_isn, client_next = synack[0], synack[1]
        time.sleep(0.2)  # the pod's ACK of our handshake ACK, if any, is not the answer we count
        raw.setblocking(False)
        try:
            while raw.recv(65535):
                pass
        except BlockingIOError:
            pass
        segment = _segment(local, dst, client_port, port, client_next + OUT_OF_WINDOW, server_isn + 1, b"stray")
        raw.sendto(segment, (dst, 0))
        acks = sum(1 for _, _, flags, size in _packets(raw, dst, port, client_port,
                                                       time.monotonic() + LISTEN_WINDOW)
                   if flags & ACK and not flags & SYN and size == 0)
    return {"acks": acks}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="invalidseg")
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hold")
    h.add_argument("--port", type=int, required=True)
    p = sub.add_parser("probe")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "hold":
        hold(args.port)
    else:
        print(json.dumps(probe(args.dst, args.port)))


if __name__ == "__main__":
    main(sys.argv[1:])
