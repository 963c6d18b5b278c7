"""A STUN-like reflector for the NAT lab: answers each UDP datagram, and each TCP connection,
with the address it came from ("IP PORT"). Run inside a lab namespace:

    reflector.py --udp 9000 --udp 9001 --tcp 9000 [--lifetime 60]

Prints "ready" once every socket is bound; exits by itself after --lifetime seconds."""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--udp", type=int, action="append", default=[])
    ap.add_argument("--tcp", type=int, action="append", default=[])
    ap.add_argument("--lifetime", type=float, default=60.0)
    args = ap.parse_args()
    sel = selectors.DefaultSelector()
    for port in args.udp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "udp")
    for port in args.tcp:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, "tcp")
    print("ready", flush=True)
    deadline = time.monotonic() + args.lifetime
    while (left := deadline - time.monotonic()) > 0:
        for key, _ in sel.select(timeout=min(left, 1.0)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if key.data == "udp":
                    _, (ip, port) = sock.recvfrom(2048)
                    sock.sendto(f"{ip} {port}".encode(), (ip, port))
                else:
                    conn, (ip, port) = sock.accept()
                    with conn:
                        conn.settimeout(2.0)
                        conn.sendall(f"{ip} {port}\n".encode())
            except OSError as e:  # an ICMP error on the UDP socket, a reset connection
                print(f"error {e}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
