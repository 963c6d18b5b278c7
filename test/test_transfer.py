"""p2psc/transfer.py without a network: the message formats (round trips, limits checked
before parsing), name sanitizing, and the sender and receiver over an in-memory channel
(success, resume, an altered partial, a short transfer)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from pathlib import Path
from typing import IO

import pytest

from p2psc import transfer as t
from p2psc.p2pexcept import ChannelClosed


def test_header_round_trip_and_limits() -> None:
    h = t.Header("a.bin", 10, hashlib.sha256(b"x").digest())
    assert t.decode_header(t.encode_header(h)) == h
    h2 = t.Header(None, None, None)
    assert t.decode_header(t.encode_header(h2)) == h2
    with pytest.raises(t.TransferError, match="too large"):
        t.decode_header(t.HEADER_MAGIC + b" " * t.MAX_HEADER_SIZE)
    bad = [b"garbage", t.HEADER_MAGIC + b"{", t.HEADER_MAGIC + b"[]",
           t.HEADER_MAGIC + b'{"name": 1, "size": 1, "sha256": null}',
           t.HEADER_MAGIC + b'{"name": "a", "size": -1, "sha256": null}',
           t.HEADER_MAGIC + b'{"name": "a", "size": true, "sha256": null}',
           t.HEADER_MAGIC + b'{"name": "a", "size": null, "sha256": "' + b"0" * 64 + b'"}',
           t.HEADER_MAGIC + b'{"name": "a", "size": 1, "sha256": "xyz"}',
           t.HEADER_MAGIC + b'{"name": "a", "size": 1, "sha256": null, "x": 1}',
           t.HEADER_MAGIC + json.dumps({"name": "n" * 201, "size": 1,
                                        "sha256": None}).encode()]
    for msg in bad:
        with pytest.raises(t.TransferError):
            t.decode_header(msg)
    # a long name is cut (at a character boundary) by the sender
    long = t.encode_header(t.Header("é" * 300, None, None))
    name = t.decode_header(long).name
    assert name is not None and len(name.encode()) <= t.MAX_NAME_BYTES


def test_control_messages_round_trip_and_reject_bad_lengths() -> None:
    d = bytes(range(32))
    assert t.decode_ready(t.encode_ready(5, d)) == (5, d)
    assert t.decode_start(t.encode_start(7)) == 7
    assert t.decode_end(t.encode_end(9, d)) == (9, d)
    assert t.decode_ack(t.encode_ack(9, d)) == (9, d)
    assert t.decode_fail(t.encode_fail("hash\nmismatch")) == "hash mismatch"
    assert len(t.encode_fail("x" * 10000)) <= 1 + 512
    for func, msg in ((t.decode_ready, b"R" + bytes(39)), (t.decode_start, b"S"),
                      (t.decode_end, b"E" + bytes(41)), (t.decode_ack, b"X" + bytes(40))):
        with pytest.raises(t.TransferError):
            func(msg)


@pytest.mark.parametrize(("name", "safe"), [
    ("../../etc/passwd", "passwd"), ("/abs/path/f.txt", "f.txt"), ("..", t.DEFAULT_NAME),
    ("a\\..\\b.exe", "b.exe"), (".hidden", "hidden"), ("x\x00y\x1b[2J\n", "xy[2J"),
    ("", t.DEFAULT_NAME), (None, t.DEFAULT_NAME), ("a/", t.DEFAULT_NAME),
    ("ok name.tar.gz", "ok name.tar.gz"), ("f.p2psc-partial", "f.p2psc-partial_"),
    ("\u202eexe.txt", "exe.txt"),
])
def test_safe_name(name: str | None, safe: str) -> None:
    assert t.safe_name(name) == safe


class Pipe:
    """One end of an in-memory channel."""

    def __init__(self, inbox: asyncio.Queue[bytes | None], outbox: asyncio.Queue[bytes | None]):
        self.inbox, self.outbox = inbox, outbox

    async def send(self, data: bytes) -> None:
        await self.outbox.put(bytes(data))

    async def recv(self) -> bytes:
        msg = await self.inbox.get()
        if msg is None:
            self.inbox.put_nowait(None)
            raise ChannelClosed("closed")
        return msg


def pipes() -> tuple[Pipe, Pipe]:
    a: asyncio.Queue[bytes | None] = asyncio.Queue()
    b: asyncio.Queue[bytes | None] = asyncio.Queue()
    return Pipe(a, b), Pipe(b, a)


async def read(f: IO[bytes], n: int) -> bytes:
    return f.read(n)


async def run_pair(data: bytes, folder: Path, name: str = "f.bin",
                   regular: bool = True) -> tuple[tuple[int, int, int], t.Outcome]:
    s, r = pipes()

    async def receiver() -> t.Outcome:
        header = t.decode_header(await r.recv())
        return await t.receive(r, header, peer="p.test", folder=folder)

    task = asyncio.ensure_future(receiver())
    result = await t.send_stream(s, io.BytesIO(data), name=name, regular=regular,
                                 chunk_size=1000, read=read)
    return result, await task


def test_send_receive_resume_and_altered_partial(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    result, out = asyncio.run(run_pair(data, tmp_path))
    assert result == (10_000, 0, 10_000) and out.ok
    assert (tmp_path / "f.bin").read_bytes() == data
    # the same name again never overwrites: f.bin.1
    _, out = asyncio.run(run_pair(data, tmp_path))
    assert out.path == tmp_path / "f.bin.1"

    # a partial of the same file from the same peer is resumed
    part, side = t.partial_paths(tmp_path, "g.bin", "p.test")
    part.write_bytes(data[:4000])
    side.write_text(json.dumps({"peer": "p.test", "name": "g.bin", "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}))
    result, out = asyncio.run(run_pair(data, tmp_path, "g.bin"))
    assert result == (10_000, 4000, 6000) and out.resumed_at == 4000 and out.received == 6000
    assert (tmp_path / "g.bin").read_bytes() == data
    assert not part.exists() and not side.exists()

    # an altered partial is detected (prefix hash) and restarted from 0
    part.write_bytes(b"X" + data[1:4000])
    side.write_text(json.dumps({"peer": "p.test", "name": "g.bin", "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}))
    result, out = asyncio.run(run_pair(data, tmp_path, "h/../g.bin"))
    assert result == (10_000, 0, 10_000) and out.resumed_at == 0
    assert (tmp_path / "g.bin.1").read_bytes() == data

    # another peer's partial is not resumed
    part.write_bytes(data[:4000])
    side.write_text(json.dumps({"peer": "other.test", "name": "g.bin", "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}))
    result, _ = asyncio.run(run_pair(data, tmp_path, "g.bin"))
    assert result[1] == 0


def test_stdin_unknown_size_and_a_short_transfer(tmp_path: Path) -> None:
    data = os.urandom(3333)
    result, out = asyncio.run(run_pair(data, tmp_path, "", regular=False))
    assert result == (3333, 0, 3333) and out.ok
    assert (tmp_path / t.DEFAULT_NAME).read_bytes() == data

    async def short() -> t.Outcome:
        s, r = pipes()
        digest = hashlib.sha256(data).digest()
        await s.send(t.encode_header(t.Header("s.bin", len(data), digest)))
        header = t.decode_header(await r.recv())
        task = asyncio.ensure_future(t.receive(r, header, peer="p.test", folder=tmp_path))
        assert t.decode_ready(await s.recv())[0] == 0
        await s.send(t.encode_start(0))
        await s.send(t.encode_data(data[:1000]))
        await s.outbox.put(None)  # the sender closes before END
        return await task

    out = asyncio.run(short())
    assert not out.ok and "before the end" in out.reason and out.received == 1000
    assert not (tmp_path / "s.bin").exists()
    part, side = t.partial_paths(tmp_path, "s.bin", "p.test")
    assert part.read_bytes() == data[:1000] and side.exists()

    async def wrong_hash() -> tuple[t.Outcome, bytes]:
        s, r = pipes()
        await s.send(t.encode_header(t.Header("w.bin", None, None)))
        header = t.decode_header(await r.recv())
        task = asyncio.ensure_future(t.receive(r, header, peer="p.test", folder=tmp_path))
        await s.recv()
        await s.send(t.encode_start(0))
        await s.send(t.encode_data(b"abc"))
        await s.send(t.encode_end(3, bytes(32)))
        return await task, await s.recv()

    out, reply = asyncio.run(wrong_hash())
    assert not out.ok and out.reason == "hash mismatch"
    assert t.decode_fail(reply) == "hash mismatch"
    assert not (tmp_path / "w.bin").exists()
