"""A p2psc peer for the NAT lab (run inside a network namespace by test/test_nat_lab_p2p.py and
bench/nat.py): a TCP or UDP echo server, or a client that measures the time to its first
echoed message and prints one JSON line.

    python test/nat_peer.py serve-udp WORKDIR
    python test/nat_peer.py serve-tcp WORKDIR
    python test/nat_peer.py udp WORKDIR PEER_ID [COUNT] [HOLD_SECONDS]
    python test/nat_peer.py tcp WORKDIR PEER_ID [COUNT]
    python test/nat_peer.py netcheck WORKDIR

A client sends COUNT numbered messages (each 1000 bytes, derived from its number), checks each
echo byte for byte, and prints ``{"ok": ..., "path": ..., "first_ms": ..., "echoed": N, ...}``.
HOLD_SECONDS (UDP) then waits silently that long and sends one more message: a NAT mapping
that expired meanwhile loses it, unless the keepalives held it. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from typing import Any

from p2psc.p2p import TcpP2P
from p2psc.p2phandler import P2PHandler
from p2psc.udp_p2p import UdpP2P

TIMEOUT = 30.0


def payload(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest() * 31 + bytes(8)


class UdpEcho(UdpP2P):
    def on_datagram(self, data: bytes, peer_id: str, addr: Any) -> None:
        self.reply(data)


class TcpEcho(TcpP2P):
    def on_recv(self, data: bytes) -> None:
        self.send(data)


async def serve(kind: str, workdir: str) -> None:
    handler = P2PHandler(workdir=workdir)
    if kind == "serve-udp":
        await handler.run_as_udp_server(UdpEcho)
    else:
        await handler.run_as_server(TcpEcho)
    attached = False
    if handler.nat is not None:
        await asyncio.wait_for(handler.nat.ensure_link(), TIMEOUT)
        await asyncio.sleep(0.5)  # its UDP mapping probed
        attached = True
    print(json.dumps({"serving": kind, "attached": attached}), flush=True)
    try:
        await asyncio.sleep(3600)
    finally:
        await handler.close()


async def client(kind: str, workdir: str, peer_id: str, count: int, hold: float) -> dict[str, Any]:
    handler = P2PHandler(workdir=workdir)
    got: asyncio.Queue[bytes] = asyncio.Queue()
    result: dict[str, Any] = {"ok": False, "kind": kind}
    start = time.perf_counter()
    try:
        if kind == "udp":
            class C(UdpP2P):
                def on_recv(self, data: bytes, addr: Any) -> None:
                    got.put_nowait(data)
            _, uproto = await asyncio.wait_for(handler.connect_udp_peer(peer_id, C), TIMEOUT)
            await asyncio.wait_for(uproto.wait_handshaked(), TIMEOUT)
            proto: Any = uproto
        else:
            class T(TcpP2P):
                def on_recv(self, data: bytes) -> None:
                    got.put_nowait(data)
            _, tproto = await asyncio.wait_for(handler.connect_peer(peer_id, T), TIMEOUT)
            await asyncio.wait_for(tproto.wait_handshaked(), TIMEOUT)
            proto = tproto
        result["path"] = proto.path
        result["handshake_ms"] = round((time.perf_counter() - start) * 1000, 1)
        echoed = 0
        for i in range(count):
            proto.send(payload(i))
            try:
                data = await asyncio.wait_for(got.get(), 5.0)
            except asyncio.TimeoutError:
                result["error"] = f"no echo of message {i}"
                break
            if data != payload(i):
                result["error"] = f"echo of message {i} differs"
                break
            if i == 0:
                result["first_ms"] = round((time.perf_counter() - start) * 1000, 1)
            echoed += 1
        result["echoed"] = echoed
        if hold:  # say how far it got before the silent wait (the rebinding test rebinds now)
            print(json.dumps({"echoed": echoed, "path": result.get("path")}), flush=True)
        if hold and echoed == count:
            await asyncio.sleep(hold)
            proto.send(payload(count))
            try:
                data = await asyncio.wait_for(got.get(), 10.0)
                result["after_hold"] = data == payload(count)
            except asyncio.TimeoutError:
                result["after_hold"] = False
            result["path_end"] = proto.path
        result["ok"] = echoed == count and result.get("after_hold", True) is True
    except Exception as exc:  # reported, not raised: the test reads the JSON line
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await handler.close()
    return result


async def netcheck(workdir: str) -> dict[str, Any]:
    handler = P2PHandler(workdir=workdir)
    try:
        assert handler.nat is not None
        loop = asyncio.get_running_loop()
        proto = UdpP2P(handler, handler.get_myid())
        import socket
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind(("0.0.0.0", 0))
        proto.attach(sock)
        await loop.create_datagram_endpoint(lambda: proto, sock=sock)
        report = await asyncio.wait_for(handler.nat.netcheck(proto), TIMEOUT)
        return dict(report.__dict__)
    finally:
        await handler.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    kind, workdir = sys.argv[1], sys.argv[2]
    if kind.startswith("serve"):
        asyncio.run(serve(kind, workdir))
    elif kind == "netcheck":
        print(json.dumps(asyncio.run(netcheck(workdir))), flush=True)
    else:
        count = int(sys.argv[4]) if len(sys.argv) > 4 else 3
        hold = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
        print(json.dumps(asyncio.run(client(kind, workdir, sys.argv[3], count, hold))),
              flush=True)


if __name__ == "__main__":
    main()
