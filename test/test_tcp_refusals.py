"""What the TCP side refuses (issue 2): a wrong key, an unknown peer, a replayed INIT, a
flipped bit, an over-limit length, a truncated stream. Each is refused as specified, nothing
reaches the application, and the server goes on serving a legitimate peer."""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Callable

import pytest

from attack_util import Client, assert_still_serving, recorder
from conftest import TcpProxy, make_peer, point_at, rsa_key, run, server_port
from p2psc._proto.tcp import HEADER_LEN, RecordType
from p2psc.p2pexcept import (ConnectionLost, CRCError, HandshakeError, RecordTooLarge,
                             SignCheckError, UnknownPeerError)
from p2psc.p2phandler import P2PHandler


async def wait_for_entry(log: list[tuple[str, Any]], kind: str, timeout: float = 5.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        for k, v in log:
            if k == kind:
                return v
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {kind!r} in {log}")


def test_peer_with_wrong_private_key_is_refused(pair: Any, tmp_path: Any, loop_kind: str) -> None:
    server_dir, client_dir = pair
    # the client signs with another key than the one the server has on file for client.test
    impostor = make_peer(tmp_path / "x", "client.test", key_name="impostor")

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        impostor.know(server_dir, port=server_port(server))
        client = P2PHandler(workdir=impostor.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        with pytest.raises(HandshakeError):
            await asyncio.wait_for(proto.wait_handshaked(), 5)
        exc = await wait_for_entry(R.log, "closed")
        assert type(exc) is SignCheckError
        assert [k for k, _ in R.log] == ["closed"]
        await assert_still_serving(server, server_dir, tmp_path)
        await client.close()
        await server.close()

    run(main(), loop=loop_kind)


def test_client_refuses_a_server_with_the_wrong_key(pair: Any, tmp_path: Any) -> None:
    """The client has another public key on file for server.test than the server's key."""
    server_dir, client_dir = pair

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        client_dir.know(server_dir, port=server_port(server), key=rsa_key("someone-else"))
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        # the server's RESP does not verify with the key the client holds
        with pytest.raises(SignCheckError):
            await asyncio.wait_for(proto.wait_handshaked(), 5)
        exc = await wait_for_entry(R.log, "closed")
        assert type(exc) is HandshakeError and "during the handshake" in str(exc)
        assert not any(k == "handshaked" for k, _ in R.log)
        await client.close()
        await server.close()

    run(main())


def test_unknown_peer_is_refused(pair: Any, tmp_path: Any) -> None:
    server_dir, _ = pair
    stranger = make_peer(tmp_path, "stranger.test")

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        stranger.know(server_dir, port=server_port(server))
        client = P2PHandler(workdir=stranger.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        with pytest.raises(HandshakeError):
            await asyncio.wait_for(proto.wait_handshaked(), 5)
        exc = await wait_for_entry(R.log, "closed")
        assert type(exc) is UnknownPeerError
        assert [k for k, _ in R.log] == ["closed"]
        await assert_still_serving(server, server_dir, tmp_path)
        await client.close()
        await server.close()

    run(main())


async def _read_all(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def test_replayed_init_is_refused(pair: Any, tmp_path: Any, loop_kind: str) -> None:
    server_dir, client_dir = pair

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        proxy = await TcpProxy(server_port(server)).start()
        point_at(client_dir, server_dir, proxy.port)
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        await asyncio.wait_for(proto.wait_handshaked(), 5)
        await client.close()
        stream = b"".join(proxy.captured["c2s"])
        (init_len,) = struct.unpack_from(">I", stream)
        init = stream[:HEADER_LEN + init_len]
        assert init[4] == RecordType.INIT
        assert await wait_for_entry(R.log, "closed") is None  # the genuine session ended
        R.log.clear()
        # the server answers a replayed INIT with nothing at all, and closes
        assert await _read_all(server_port(server), init) == b""
        exc = await wait_for_entry(R.log, "closed")
        assert type(exc) is HandshakeError and "replayed INIT" in str(exc)
        assert [k for k, _ in R.log] == ["closed"]
        await assert_still_serving(server, server_dir, tmp_path)
        await proxy.close()
        await server.close()

    run(main(), loop=loop_kind)


def _record_mutator(target_record: int, mutate: Callable[[bytearray], bytearray | None]
                    ) -> Callable[[str, int, bytes], bytes]:
    """A TcpProxy hook for the client-to-server direction: parses the record stream and
    applies ``mutate`` to the whole record number ``target_record`` (0 = INIT); returning
    None from ``mutate`` cuts the stream there."""
    state = {"buf": bytearray(), "index": 0, "cut": False}

    def hook(direction: str, _chunk: int, data: bytes) -> bytes:
        if direction != "c2s" or state["cut"]:
            return data if not state["cut"] else b""
        buf: bytearray = state["buf"]  # type: ignore[assignment]
        buf += data
        out = bytearray()
        while len(buf) >= HEADER_LEN:
            (n,) = struct.unpack_from(">I", buf)
            if len(buf) < HEADER_LEN + n:
                break
            rec = bytearray(buf[:HEADER_LEN + n])
            del buf[:HEADER_LEN + n]
            if state["index"] == target_record:
                mutated = mutate(rec)
                if mutated is None:
                    state["cut"] = True
                    out += rec[: len(rec) // 2]
                    return bytes(out)
                rec = mutated
            state["index"] += 1  # type: ignore[operator]
            out += rec
        return bytes(out)

    return hook


def test_data_record_with_one_flipped_bit_closes_the_connection(
        pair: Any, tmp_path: Any, loop_kind: str) -> None:
    server_dir, client_dir = pair

    def flip(rec: bytearray) -> bytearray:
        rec[HEADER_LEN + 3] ^= 0x10
        return rec

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        # records from the client: 0 INIT, 1 FINISHED, 2 first data message
        proxy = await TcpProxy(server_port(server), _record_mutator(2, flip)).start()
        point_at(client_dir, server_dir, proxy.port)
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        await asyncio.wait_for(proto.wait_handshaked(), 5)
        proto.send(b"attack at dawn")
        proto.send(b"second message")
        exc = await wait_for_entry(R.log, "closed")
        assert type(exc) is CRCError
        assert [k for k, _ in R.log] == ["handshaked", "closed"]
        assert isinstance(await asyncio.wait_for(proto.closed, 5), ConnectionLost)
        assert proto.received == []
        await assert_still_serving(server, server_dir, tmp_path)
        await proxy.close()
        await server.close()

    run(main(), loop=loop_kind)


def test_length_prefix_over_the_limit_is_refused_before_buffering(pair: Any, tmp_path: Any) -> None:
    server_dir, client_dir = pair
    server_dir.update_conf(max_message_size=1000)

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        port = server_port(server)
        # before any handshake: a header announcing 2**32-1 bytes is refused at once
        assert await _read_all(port, struct.pack(">IB", 2**32 - 1, RecordType.INIT)) == b""
        exc = await wait_for_entry(R.log, "closed")
        assert type(exc) is RecordTooLarge
        R.log.clear()
        # after the handshake: a record over the server's max_message_size
        point_at(client_dir, server_dir, port)
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        await asyncio.wait_for(proto.wait_handshaked(), 5)
        proto.send(b"z" * 995)  # its echo is exactly at the server's limit
        assert await asyncio.wait_for(proto.got, 5) == b"recv:" + b"z" * 995
        proto.send(b"z" * 5000)
        exc = await wait_for_entry(R.log, "closed")
        assert type(exc) is RecordTooLarge
        assert [k for k, _ in R.log] == ["handshaked", "recv", "closed"]
        await assert_still_serving(server, server_dir, tmp_path)
        await client.close()
        await server.close()

    run(main())


def test_truncated_stream_is_a_lost_connection_not_a_message(pair: Any, tmp_path: Any) -> None:
    server_dir, client_dir = pair

    async def main() -> None:
        R = recorder()
        server = P2PHandler(workdir=server_dir.workdir)
        await server.run_as_server(ProtocolClass=R)
        # the proxy forwards half of the first data record, then closes the stream
        proxy = await TcpProxy(server_port(server), _record_mutator(2, lambda rec: None)).start()
        point_at(client_dir, server_dir, proxy.port)
        client = P2PHandler(workdir=client_dir.workdir)
        _, proto = await client.connect_peer("server.test", ProtocolClass=Client)
        await asyncio.wait_for(proto.wait_handshaked(), 5)
        proto.send(b"a message that never arrives whole" * 10)
        await asyncio.sleep(0.2)
        for w in proxy._writers:
            w.close()
        exc = await wait_for_entry(R.log, "closed")
        assert type(exc) is ConnectionLost
        assert [k for k, _ in R.log] == ["handshaked", "closed"]
        await assert_still_serving(server, server_dir, tmp_path)
        await client.close()
        await proxy.close()
        await server.close()

    run(main())
