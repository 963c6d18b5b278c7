"""An outside review of p2psc/transfer.py (send / listen --out): a malicious but
authenticated sender, a hostile local folder (symlinks planted at the partial and sidecar
paths), silent peers. Each test states the property the receiver or sender must keep."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from test_transfer import pipes, read

from p2psc import transfer as t


async def transfer(data: bytes, folder: Path, name: str = "f.bin", peer: str = "p.test",
                   ) -> tuple[BaseException | tuple[int, int, int], t.Outcome]:
    """An honest sender against :func:`t.receive`; the sender's result or its exception."""
    s, r = pipes()

    async def receiver() -> t.Outcome:
        header = t.decode_header(await r.recv())
        return await t.receive(r, header, peer=peer, folder=folder)

    task = asyncio.ensure_future(receiver())
    try:
        result: BaseException | tuple[int, int, int] = await t.send_stream(
            s, io.BytesIO(data), name=name, regular=True, chunk_size=1000, read=read)
    except t.TransferError as exc:
        result = exc
    return result, await asyncio.wait_for(task, 10)


def sidecar(side: Path, data: bytes, peer: str = "p.test", name: str = "f.bin") -> None:
    side.write_text(json.dumps({"peer": peer, "name": name, "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}))


def _assert_saved_inside(out: t.Outcome, folder: Path, data: bytes, victim: Path) -> None:
    if out.ok:
        assert out.path is not None and out.path.parent == folder
        assert not out.path.is_symlink()
        assert out.path.read_bytes() == data
        assert not os.path.samefile(out.path, victim)


# -- symlinks planted in the output folder -------------------------------------------------------

def test_partial_symlink_is_not_followed(tmp_path: Path) -> None:
    """A symlink at .NAME.p2psc-partial (pointing outside DIR) must not be truncated,
    written through, or hard-linked to the final name."""
    folder = tmp_path / "in"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the user's precious file\n")
    part, _ = t.partial_paths(folder, "f.bin", "p.test")
    part.symlink_to(victim)
    data = os.urandom(5000)
    _, out = asyncio.run(transfer(data, folder))
    assert victim.read_bytes() == b"the user's precious file\n"
    _assert_saved_inside(out, folder, data, victim)


def test_partial_symlink_with_sidecar_is_not_offered_for_resume(tmp_path: Path) -> None:
    """With a matching sidecar beside a symlinked partial, the receiver must not hash the
    symlink's target (READY would leak a SHA-256 of a file outside DIR to the peer) nor
    resume on top of it."""
    folder = tmp_path / "in"
    folder.mkdir()
    data = os.urandom(5000)
    victim = tmp_path / "secret"
    victim.write_bytes(data[:100])  # e.g. a guessable secret outside DIR
    part, side = t.partial_paths(folder, "f.bin", "p.test")
    part.symlink_to(victim)
    sidecar(side, data)

    async def run() -> tuple[int, t.Outcome]:
        s, r = pipes()
        await s.send(t.encode_header(t.Header("f.bin", len(data),
                                              hashlib.sha256(data).digest())))
        task = asyncio.ensure_future(
            t.receive(r, t.decode_header(await r.recv()), peer="p.test", folder=folder))
        offset, _ = t.decode_ready(await s.recv())
        await s.send(t.encode_fail("bye"))
        return offset, await asyncio.wait_for(task, 10)

    offset, out = asyncio.run(run())
    assert offset == 0
    assert victim.read_bytes() == data[:100]


def test_sidecar_tmp_symlink_is_not_followed(tmp_path: Path) -> None:
    """A symlink at .NAME.p2psc-partial.json.tmp must not be written through (it would
    replace the target's content with the sidecar's JSON)."""
    folder = tmp_path / "in"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me\n")
    _, side = t.partial_paths(folder, "f.bin", "p.test")
    side.with_name(side.name + ".tmp").symlink_to(victim)
    data = os.urandom(3000)
    _, out = asyncio.run(transfer(data, folder))
    assert victim.read_bytes() == b"keep me\n"
    _assert_saved_inside(out, folder, data, victim)


def test_sidecar_symlink_is_not_written_through(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me\n")
    _, side = t.partial_paths(folder, "f.bin", "p.test")
    side.symlink_to(victim)
    data = os.urandom(3000)
    _, out = asyncio.run(transfer(data, folder))
    assert victim.read_bytes() == b"keep me\n"
    _assert_saved_inside(out, folder, data, victim)


def test_existing_files_and_symlinks_under_the_final_name_are_kept(tmp_path: Path) -> None:
    """Never overwrite what the user has (a file, a symlink, a dangling symlink): the
    verified file goes to NAME.1, NAME.2, ... instead."""
    folder = tmp_path / "in"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"v")
    (folder / "a").write_bytes(b"mine")
    (folder / "b").symlink_to(victim)
    (folder / "c").symlink_to(tmp_path / "nowhere")
    for name in ("a", "b", "c"):
        data = os.urandom(100)
        _, out = asyncio.run(transfer(data, folder, name))
        assert out.ok and out.path == folder / f"{name}.1"
        assert out.path.read_bytes() == data
    assert (folder / "a").read_bytes() == b"mine" and victim.read_bytes() == b"v"
    assert (folder / "b").is_symlink() and (folder / "c").is_symlink()


# -- a malicious sender ---------------------------------------------------------------------------

async def _manual(folder: Path | None, header: t.Header,
                  script: list[bytes]) -> tuple[t.Outcome, list[bytes]]:
    """Send ``header``, read READY, then send ``script``; the outcome and the replies."""
    s, r = pipes()
    chunks: list[bytes] = []

    async def stdout(b: bytes) -> None:
        chunks.append(b)

    async def flush() -> None:
        return None

    await s.send(t.encode_header(header))
    task = asyncio.ensure_future(t.receive(
        r, t.decode_header(await r.recv()), peer="p.test", folder=folder,
        write_stdout=stdout, flush_stdout=flush))
    replies = [await s.recv()]
    for m in script:
        await s.send(m)
    out = await asyncio.wait_for(task, 10)
    while not s.inbox.empty():
        reply = s.inbox.get_nowait()
        if reply is not None:
            replies.append(reply)
    return out, replies


@pytest.mark.parametrize("size", [-1, 2**63, 2**64, 1.5, "1", True])
def test_bad_sizes_are_rejected_before_anything(size: object) -> None:
    body = {"name": "x", "size": size, "sha256": None}
    with pytest.raises(t.TransferError):
        t.decode_header(t.HEADER_MAGIC + json.dumps(body).encode())


def test_huge_announced_size_allocates_nothing_and_chunks_beyond_it_fail(
        tmp_path: Path) -> None:
    digest = hashlib.sha256(b"").digest()
    out, replies = asyncio.run(_manual(tmp_path, t.Header("big", t.MAX_SIZE, digest),
                                       [t.encode_start(0), t.encode_data(b"x" * 10),
                                        t.encode_end(10, hashlib.sha256(b"x" * 10).digest())]))
    assert not out.ok and "size mismatch" in out.reason
    part, _ = t.partial_paths(tmp_path, "big", "p.test")
    assert part.stat().st_size == 10 and not (tmp_path / "big").exists()

    out, replies = asyncio.run(_manual(tmp_path, t.Header("small", 5, None),
                                       [t.encode_start(0), t.encode_data(b"123"),
                                        t.encode_data(b"456")]))
    assert not out.ok and out.reason == "more data than announced"
    assert t.partial_paths(tmp_path, "small", "p.test")[0].read_bytes() == b"123"
    assert replies[-1][:1] == t.FAIL


@pytest.mark.parametrize("script", [
    [t.encode_start(5)],  # an offset that was not offered
    [t.encode_start(0), b"", ],
    [t.encode_start(0), b"D"],  # empty DATA
    [t.encode_start(0), b"\xff" * 70000],
    [t.encode_start(0), t.encode_end(0, bytes(32)) + b"x"],
    [t.encode_start(0), t.encode_ack(0, hashlib.sha256(b"").digest())],
    [t.encode_header(t.Header("again", None, None))],
    [b"S"],
])
def test_garbage_from_the_sender_fails_cleanly(tmp_path: Path, script: list[bytes]) -> None:
    for folder in (tmp_path, None):
        out, replies = asyncio.run(_manual(folder, t.Header("g", None, None), script))
        assert not out.ok and out.reason and replies[-1][:1] == t.FAIL
        assert not (tmp_path / "g").exists()


def test_end_with_the_right_size_but_another_hash_is_not_published(tmp_path: Path) -> None:
    data = b"A" * 100
    evil = b"B" * 100
    out, replies = asyncio.run(_manual(
        tmp_path, t.Header("h", 100, hashlib.sha256(data).digest()),
        [t.encode_start(0), t.encode_data(evil),
         t.encode_end(100, hashlib.sha256(evil).digest())]))
    assert not out.ok and out.reason == "hash mismatch" and not (tmp_path / "h").exists()
    assert all(r[:1] != t.ACK for r in replies)


def test_another_peers_transfer_does_not_destroy_a_partial(tmp_path: Path) -> None:
    data = os.urandom(5000)
    part, side = t.partial_paths(tmp_path, "f.bin", "alice.test")
    part.write_bytes(data[:3000])
    sidecar(side, data, peer="alice.test")
    other = os.urandom(4000)
    _, out = asyncio.run(transfer(other, tmp_path, "f.bin", peer="mallory.test"))
    assert out.ok
    # alice's interrupted transfer can still resume at 3000
    result, out = asyncio.run(transfer(data, tmp_path, "f.bin", peer="alice.test"))
    assert out.ok and out.resumed_at == 3000


# -- silent peers: nothing may wait forever ------------------------------------------------------

def test_receiver_gives_up_on_a_silent_sender(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender that sends a header (or some data) and then nothing, while its library keeps
    the session alive, must not hold the transfer (and one of the listener's MAX_TRANSFERS
    slots, the name, or the stdout lock) forever."""
    monkeypatch.setattr(t, "IDLE_TIMEOUT", 0.3, raising=False)

    async def silent(script: list[bytes], header: t.Header) -> t.Outcome:
        s, r = pipes()
        await s.send(t.encode_header(header))
        task = asyncio.ensure_future(
            t.receive(r, t.decode_header(await r.recv()), peer="p.test", folder=tmp_path))
        await s.recv()
        for m in script:
            await s.send(m)
        return await asyncio.wait_for(task, 5)

    for script in ([], [t.encode_start(0)], [t.encode_start(0), t.encode_data(b"x")]):
        out = asyncio.run(silent(script, t.Header("slow", 10,
                                                  hashlib.sha256(b"0" * 10).digest())))
        assert not out.ok and "no message" in out.reason
    # a stdin stream (size unknown) may pause between chunks, but must answer READY
    out = asyncio.run(silent([], t.Header("slow", None, None)))
    assert not out.ok and "no message" in out.reason


def test_sender_gives_up_on_a_silent_receiver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A receiver that never sends READY, or never acknowledges after END, does not keep
    'p2psc send' waiting forever (IDLE_TIMEOUT plus what hashing the file would take)."""
    monkeypatch.setattr(t, "IDLE_TIMEOUT", 0.3, raising=False)

    async def no_ready() -> None:
        s, _r = pipes()
        with pytest.raises(t.TransferError, match="no READY from the receiver"):
            await asyncio.wait_for(t.send_stream(
                s, io.BytesIO(b"x"), name="x", regular=True, chunk_size=10, read=read), 5)

    async def no_ack() -> None:
        s, r = pipes()

        async def receiver() -> None:
            t.decode_header(await r.recv())
            await r.send(t.encode_ready(0, bytes(32)))
            while (await r.recv())[:1] != t.END:
                pass  # START, DATA...; then silence

        task = asyncio.ensure_future(receiver())
        with pytest.raises(t.TransferError, match="no acknowledgement"):
            await asyncio.wait_for(t.send_stream(
                s, io.BytesIO(b"xyz"), name="x", regular=True, chunk_size=10, read=read), 5)
        await asyncio.wait_for(task, 5)

    asyncio.run(no_ready())
    asyncio.run(no_ack())


# -- the sender's acknowledgement ----------------------------------------------------------------

def test_sender_rejects_an_ack_before_end_and_a_stale_ack() -> None:
    data = os.urandom(50_000)

    async def early(reply_at: str) -> BaseException | None:
        s, r = pipes()
        digest = hashlib.sha256(data).digest()

        async def receiver() -> None:
            t.decode_header(await r.recv())
            if reply_at == "ready":
                await r.send(t.encode_ack(len(data), digest))
                return
            await r.send(t.encode_ready(0, bytes(32)))
            await r.recv()
            if reply_at == "start":  # ack the whole file before any data
                await r.send(t.encode_ack(len(data), digest))
            else:  # an ack of some previous (empty) transfer
                while (await r.recv())[:1] != t.END:
                    pass
                await r.send(t.encode_ack(0, hashlib.sha256(b"").digest()))

        task = asyncio.ensure_future(receiver())
        try:
            await t.send_stream(s, io.BytesIO(data), name="x", regular=True,
                                chunk_size=1000, read=read)
        except t.TransferError as exc:
            return exc
        finally:
            await task
        return None

    for at in ("ready", "stale"):
        assert isinstance(asyncio.run(early(at)), t.TransferError), at
