"""The file transfer protocol of ``p2psc send`` and ``p2psc listen`` (docs/CLI.md).

Over one authenticated channel, one transfer::

    sender                                   receiver
    HEADER  magic + JSON {name, size, sha256}  ->
                                          <-  READY  b"R" + offset(8) + SHA-256 of the
                                                     receiver's first `offset` bytes
    START   b"S" + offset(8)                ->       (the offered offset if the sender's
                                                      own prefix hashes the same, else 0)
    DATA    b"D" + 1..chunk bytes           ->       (repeated)
    END     b"E" + total size(8) + SHA-256  ->
                                          <-  ACK    b"A" + size(8) + SHA-256, only after
                                                     the data is verified, written, flushed
                                                     (fsync for files) and renamed
                                          <-  FAIL   b"X" + UTF-8 reason, at any time

``size`` and ``sha256`` are ``null`` when unknown (stdin); a resume needs both. The message
formats are pure functions here; every length is checked before anything is allocated.
The sender (:func:`send_stream`) and receiver (:func:`receive`) logic run over any object
with ``send``/``recv`` (a :class:`~p2psc.channel.Channel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import stat
import struct
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from .p2pexcept import TransferError

__all__ = [
    "HEADER_MAGIC", "MAX_HEADER_SIZE", "MAX_NAME_BYTES", "MAX_SIZE", "Header", "Outcome",
    "TransferError", "decode_ack", "decode_end", "decode_fail", "decode_header",
    "decode_ready", "decode_start", "encode_ack", "encode_data", "encode_end",
    "encode_fail", "encode_header", "encode_ready", "encode_start", "hash_file", "is_header",
    "partial_paths", "receive", "safe_name", "send_stream",
]

HEADER_MAGIC = b"\x00p2psc-xfer-v1\x00"
MAX_HEADER_SIZE = 4096
MAX_NAME_BYTES = 200  # leaves room for ".NAME.TAG.p2psc-partial.json" within 255 bytes
MAX_SIZE = 2**63 - 1
MAX_REASON_BYTES = 512
#: Seconds the receiver waits for the sender's next message (a file of known size) before it
#: gives the transfer up; for START, plus the time the sender needs to hash the offered
#: prefix (at PREFIX_HASH_RATE bytes/s). Stdin transfers (size unknown) may legitimately
#: pause, so only their START is bounded.
IDLE_TIMEOUT = 300.0
PREFIX_HASH_RATE = 50e6
DEFAULT_NAME = "p2psc-received"
PARTIAL_SUFFIX = ".p2psc-partial"
READY, START, DATA, END, ACK, FAIL = b"R", b"S", b"D", b"E", b"A", b"X"
_Q = struct.Struct("!Q")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class MessageChannel(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...


@dataclass(frozen=True)
class Header:
    name: str | None
    size: int | None
    sha256: bytes | None  # 32 bytes


# -- message formats (pure) ---------------------------------------------------------------------

def encode_header(h: Header) -> bytes:
    if h.name is not None and len(h.name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        h = Header(_cut_utf8(h.name, MAX_NAME_BYTES), h.size, h.sha256)
    body = {"name": h.name, "size": h.size,
            "sha256": h.sha256.hex() if h.sha256 is not None else None}
    data = HEADER_MAGIC + json.dumps(body, ensure_ascii=True).encode("ascii")
    if len(data) > MAX_HEADER_SIZE:  # pragma: no cover - bounded by MAX_NAME_BYTES
        raise TransferError("header too large")
    return data


def is_header(msg: bytes) -> bool:
    return msg.startswith(HEADER_MAGIC)


def decode_header(msg: bytes) -> Header:
    """The header, or :class:`TransferError` (length checked before parsing)."""
    if len(msg) > MAX_HEADER_SIZE:
        raise TransferError(f"header too large ({len(msg)} bytes, at most {MAX_HEADER_SIZE})")
    if not is_header(msg):
        raise TransferError("not a transfer header")
    try:
        body = json.loads(msg[len(HEADER_MAGIC):].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TransferError("malformed header") from None
    if not isinstance(body, dict) or set(body) != {"name", "size", "sha256"}:
        raise TransferError("malformed header")
    name, size, digest = body["name"], body["size"], body["sha256"]
    if name is not None and (not isinstance(name, str)
                             or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES):
        raise TransferError("bad name in header")
    if size is not None and (type(size) is not int or not 0 <= size <= MAX_SIZE):
        raise TransferError("bad size in header")
    if digest is not None and (not isinstance(digest, str) or not _HEX64.fullmatch(digest)):
        raise TransferError("bad sha256 in header")
    if digest is not None and size is None:
        raise TransferError("a sha256 without a size in header")
    return Header(name, size, bytes.fromhex(digest) if digest is not None else None)


def encode_ready(offset: int, prefix_sha256: bytes) -> bytes:
    return READY + _Q.pack(offset) + prefix_sha256


def decode_ready(msg: bytes) -> tuple[int, bytes]:
    if len(msg) != 41 or msg[:1] != READY:
        raise TransferError("expected READY from the receiver")
    return _Q.unpack_from(msg, 1)[0], msg[9:]


def encode_start(offset: int) -> bytes:
    return START + _Q.pack(offset)


def decode_start(msg: bytes) -> int:
    if len(msg) != 9 or msg[:1] != START:
        raise TransferError("expected START from the sender")
    offset: int = _Q.unpack_from(msg, 1)[0]
    return offset


def encode_data(chunk: bytes) -> bytes:
    return DATA + chunk


def encode_end(size: int, sha256: bytes) -> bytes:
    return END + _Q.pack(size) + sha256


def decode_end(msg: bytes) -> tuple[int, bytes]:
    if len(msg) != 41 or msg[:1] != END:
        raise TransferError("malformed END")
    return _Q.unpack_from(msg, 1)[0], msg[9:]


def encode_ack(size: int, sha256: bytes) -> bytes:
    return ACK + _Q.pack(size) + sha256


def decode_ack(msg: bytes) -> tuple[int, bytes]:
    if len(msg) != 41 or msg[:1] != ACK:
        raise TransferError("malformed ACK")
    return _Q.unpack_from(msg, 1)[0], msg[9:]


def encode_fail(reason: str) -> bytes:
    return FAIL + _cut_utf8(" ".join(reason.split()), MAX_REASON_BYTES).encode("utf-8")


def decode_fail(msg: bytes) -> str:
    text = msg[1:1 + MAX_REASON_BYTES].decode("utf-8", "replace")
    return "".join(c for c in text if c.isprintable()) or "no reason given"


def _cut_utf8(text: str, limit: int) -> str:
    return text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")


def safe_name(name: str | None) -> str:
    """A file name safe to create in the output folder: the last path component only, no
    control or format characters, no leading dot (no hidden file, no ``..``), at most
    :data:`MAX_NAME_BYTES` bytes; :data:`DEFAULT_NAME` when nothing is left."""
    if not name:
        return DEFAULT_NAME
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(c for c in name
                   if unicodedata.category(c)[0] != "C" and c not in "\u2028\u2029")
    name = name.strip().lstrip(".").strip()
    name = _cut_utf8(name, MAX_NAME_BYTES).strip()
    if not name or name.endswith(PARTIAL_SUFFIX):
        return DEFAULT_NAME if not name else name + "_"
    return name


def partial_paths(folder: Path, name: str, peer: str) -> tuple[Path, Path]:
    """(partial file, sidecar) of the safe name ``name`` from ``peer`` in ``folder``: each
    peer has its own, so one peer's transfer never truncates another's partial."""
    tag = hashlib.sha256(peer.encode("utf-8")).hexdigest()[:8]
    part = folder / f".{name}.{tag}{PARTIAL_SUFFIX}"
    return part, folder / f".{name}.{tag}{PARTIAL_SUFFIX}.json"


# -- file helpers (blocking; run in a thread) ---------------------------------------------------

def _hash_prefix(path: Path | IO[bytes], length: int, block: int = 1 << 20) -> Any:
    """hashlib object over the first ``length`` bytes (fewer if the file is shorter)."""
    h = hashlib.sha256()
    f: IO[bytes] = open(path, "rb") if isinstance(path, Path) else path  # noqa: SIM115
    try:
        if not isinstance(path, Path):
            f.seek(0)
        left = length
        while left > 0:
            b = f.read(min(block, left))
            if not b:
                break
            h.update(b)
            left -= len(b)
    finally:
        if isinstance(path, Path):
            f.close()
    return h


def hash_file(f: IO[bytes]) -> tuple[int, bytes]:
    """(size, SHA-256) of an open regular file, read from its start."""
    f.seek(0)
    h = hashlib.sha256()
    n = 0
    while b := f.read(1 << 20):
        h.update(b)
        n += len(b)
    return n, h.digest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(part: Path, folder: Path, name: str) -> Path:
    """Give the verified partial file its final name, never replacing an existing file
    (``NAME``, else ``NAME.1``, ``NAME.2``, ...)."""
    for i in range(10000):
        final = folder / (name if i == 0 else f"{name}.{i}")
        try:
            os.link(part, final, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError:  # no hard links here: check, then rename
            if final.exists():
                continue
            os.replace(part, final)
            break
        os.unlink(part)
        break
    else:  # pragma: no cover
        raise TransferError(f"{name}: too many files of that name")
    _fsync_dir(folder)
    return final


# -- sender -------------------------------------------------------------------------------------

async def _expect(ch: MessageChannel, what: str, within: float) -> bytes:
    try:
        msg = await asyncio.wait_for(ch.recv(), within)  # Channel.recv is cancel-safe
    except asyncio.TimeoutError:
        raise TransferError(f"no {what} from the receiver within {within:.0f} s") from None
    if msg[:1] == FAIL:
        raise TransferError(decode_fail(msg))
    return msg


async def send_stream(ch: MessageChannel, src: IO[bytes], *, name: str | None,
                      regular: bool, chunk_size: int,
                      read: Callable[[IO[bytes], int], Awaitable[bytes]],
                      on_progress: Callable[[int], None] | None = None,
                      known: tuple[int, bytes] | None = None,
                      ) -> tuple[int, int, int]:
    """Send ``src`` over ``ch``; returns (total size, offset resumed at, bytes sent) once the
    receiver acknowledged. Raises :class:`TransferError` with the reason otherwise.
    A regular file is hashed first, unless ``known`` gives its (size, SHA-256)."""
    size: int | None = None
    digest: bytes | None = None
    if regular:
        size, digest = known if known is not None else await asyncio.to_thread(hash_file, src)
    await ch.send(encode_header(Header(name, size, digest)))
    # the receiver may hash the partial it has before READY, and fsyncs before ACK: both
    # take at most about what hashing the whole file takes
    slack = IDLE_TIMEOUT + (size or 0) / PREFIX_HASH_RATE
    offset, their_prefix = decode_ready(await _expect(ch, "READY", slack))
    h = hashlib.sha256()
    start = 0
    if offset and regular and size is not None and offset <= size:
        h = await asyncio.to_thread(_hash_prefix, src, offset)
        if h.digest() == their_prefix:
            start = offset
        else:
            h = hashlib.sha256()
    if regular:
        await asyncio.to_thread(src.seek, start)
    await ch.send(encode_start(start))

    failed: asyncio.Future[bytes] = asyncio.ensure_future(ch.recv())
    total = start
    try:
        try:
            msg = await _stream(ch, src, failed, h, start, size, chunk_size, read, on_progress)
        except Exception:
            if failed.done() and not failed.cancelled() and failed.exception() is None \
                    and failed.result()[:1] == FAIL:
                raise TransferError(decode_fail(failed.result())) from None
            raise
        total = msg[0]
        if regular and (total != size or h.digest() != digest):
            raise TransferError("the file changed while it was being sent")
        await ch.send(encode_end(total, h.digest()))
        try:
            reply = await asyncio.wait_for(asyncio.shield(failed),
                                           IDLE_TIMEOUT + total / PREFIX_HASH_RATE)
        except asyncio.TimeoutError:
            raise TransferError(f"no acknowledgement from the receiver within "
                                f"{IDLE_TIMEOUT + total / PREFIX_HASH_RATE:.0f} s") from None
    finally:
        if not failed.done():
            failed.cancel()
    if reply[:1] == FAIL:
        raise TransferError(decode_fail(reply))
    ack = decode_ack(reply)
    if ack != (total, h.digest()):
        raise TransferError("the receiver acknowledged different data")
    return total, start, total - start


async def _stream(ch: MessageChannel, src: IO[bytes], failed: asyncio.Future[bytes], h: Any,
                  total: int, size: int | None, chunk_size: int,
                  read: Callable[[IO[bytes], int], Awaitable[bytes]],
                  on_progress: Callable[[int], None] | None) -> tuple[int]:
    while True:
        want = chunk_size if size is None else min(chunk_size, size - total)
        chunk = await read(src, want) if want > 0 else b""
        if not chunk or failed.done():
            break
        h.update(chunk)
        await ch.send(encode_data(chunk))
        total += len(chunk)
        if on_progress is not None:
            on_progress(total)
    if failed.done():
        msg = failed.result()
        raise TransferError(decode_fail(msg) if msg[:1] == FAIL
                            else "unexpected message from the receiver")
    return (total,)


# -- receiver -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What :func:`receive` reports for one transfer."""
    peer: str
    name: str
    ok: bool = False
    resumed_at: int = 0
    received: int = 0  # bytes that arrived in this run
    total: int = 0  # bytes of the content held at the end
    seconds: float = 0.0
    reason: str = ""
    path: Path | None = None
    output_closed: bool = False

    def line(self) -> str:
        rate = self.received / max(self.seconds, 1e-6)
        where = f" -> {self.path}" if self.path is not None else ""
        resumed = f", resumed at {self.resumed_at}" if self.resumed_at else ""
        if self.ok:
            return (f"received {self.name!r} from {self.peer}: {self.total} bytes "
                    f"({self.received} this run{resumed}) in {self.seconds:.2f} s, "
                    f"{rate / 1e6:.1f} MB/s, SHA-256 verified{where}")
        return (f"transfer of {self.name!r} from {self.peer} FAILED after {self.total} bytes "
                f"({self.received} this run{resumed}): {self.reason}")


class Sink(Protocol):
    """Where the content goes: stdout or a partial file."""
    async def write(self, data: bytes) -> None: ...
    async def finish(self) -> None: ...


async def _recv_within(ch: Any, seconds: float | None) -> bytes:
    if seconds is None:
        msg: bytes = await ch.recv()
        return msg
    try:
        return await asyncio.wait_for(ch.recv(), seconds)  # Channel.recv is cancel-safe
    except asyncio.TimeoutError:
        raise TransferError(f"no message from the sender for {seconds:g} s") from None


async def receive(ch: Any, header: Header, *, peer: str, folder: Path | None,
                  write_stdout: Callable[[bytes], Awaitable[None]] | None = None,
                  flush_stdout: Callable[[], Awaitable[None]] | None = None,
                  busy: set[str] | None = None) -> Outcome:
    """Receive one transfer whose ``header`` was already read from ``ch``: into ``folder``
    (``--out``; with resume) or through ``write_stdout``. Never raises for the peer's
    faults: the :class:`Outcome` says what happened (the peer was told with FAIL)."""
    name = safe_name(header.name)
    out = Outcome(peer=peer, name=name if folder is not None else (header.name or "-"))
    t0 = time.monotonic()
    busy = busy if busy is not None else set()
    if folder is not None and name in busy:
        out.reason = "a transfer of that name is already running"
        await ch.send(encode_fail(out.reason))
        return out
    busy.add(name)
    f: IO[bytes] | None = None
    try:
        h = hashlib.sha256()
        offset = 0
        if folder is not None:
            part, side = partial_paths(folder, name, peer)
            offset, h, f = await asyncio.to_thread(_resumable, part, side, header, peer)
        await ch.send(encode_ready(offset, h.digest() if offset else bytes(32)))
        idle = IDLE_TIMEOUT if header.size is not None else None
        msg = await _recv_within(ch, IDLE_TIMEOUT + offset / PREFIX_HASH_RATE)
        if msg[:1] != START:
            raise TransferError("expected START")
        start = decode_start(msg)
        if start not in (0, offset):
            raise TransferError("START at an offset that was not offered")
        if start == 0:
            h = hashlib.sha256()
        out.resumed_at = out.total = start
        if folder is not None:
            resumed, f = f, None
            f = await asyncio.to_thread(_open_partial, part, side, start, header, peer,
                                        resumed)
        while True:
            msg = await _recv_within(ch, idle)
            kind = msg[:1]
            if kind == DATA:
                data = msg[1:]
                if not data:
                    raise TransferError("empty DATA")
                if header.size is not None and out.total + len(data) > header.size:
                    raise TransferError("more data than announced")
                if f is not None:
                    await asyncio.to_thread(f.write, data)
                else:
                    assert write_stdout is not None
                    try:
                        await write_stdout(data)
                    except OSError:
                        out.output_closed = True
                        raise TransferError(
                            f"the receiver's output closed after {out.total} bytes") from None
                h.update(data)
                out.total += len(data)
                out.received += len(data)
            elif kind == END:
                total, digest = decode_end(msg)
                if total != out.total or (header.size is not None and total != header.size):
                    raise TransferError(f"size mismatch: {out.total} bytes received, "
                                        f"{total} sent")
                if digest != h.digest() or (header.sha256 is not None
                                            and digest != header.sha256):
                    raise TransferError("hash mismatch")
                if f is not None:
                    assert folder is not None
                    await asyncio.to_thread(_sync_close, f)
                    f = None
                    out.path = await asyncio.to_thread(_publish, part, folder, name)
                    with contextlib.suppress(OSError):
                        side.unlink()
                elif flush_stdout is not None:
                    try:
                        await flush_stdout()
                    except OSError:
                        out.output_closed = True
                        raise TransferError(
                            f"the receiver's output closed after {out.total} bytes") from None
                out.ok = True
                out.seconds = time.monotonic() - t0
                await ch.send(encode_ack(total, digest))
                return out
            elif kind == FAIL:
                raise TransferError(f"the sender gave up: {decode_fail(msg)}")
            else:
                raise TransferError("unexpected message")
    except TransferError as exc:
        out.reason = str(exc)
        with contextlib.suppress(Exception):
            await ch.send(encode_fail(out.reason))
    except Exception as exc:  # noqa: BLE001 - the channel ended (or an OS error)
        from .p2pexcept import ChannelClosed
        if isinstance(exc, ChannelClosed):
            out.reason = "the sender closed the channel before the end of the transfer"
        elif isinstance(exc, OSError):
            out.reason = f"cannot write: {exc.strerror or exc}"
            with contextlib.suppress(Exception):
                await ch.send(encode_fail(out.reason))
        else:
            out.reason = f"the channel was lost before the end of the transfer ({exc})"
    finally:
        busy.discard(name)
        if f is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_sync_close, f)
        out.seconds = time.monotonic() - t0
    return out


def _open_nofollow(path: Path, flags: int) -> int:
    """An fd of ``path``, never through a symlink; OSError unless a regular file."""
    fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _resumable(part: Path, side: Path, header: Header, peer: str,
               ) -> tuple[int, Any, IO[bytes] | None]:
    """(offset, hash of the partial's first offset bytes, the partial open at offset) when
    the partial may be resumed: a regular file (no symlink), same peer, same announced size
    and SHA-256; else (0, empty hash, None). The content hashed is the content kept."""
    empty = hashlib.sha256()
    if header.size is None or header.sha256 is None:
        return 0, empty, None
    try:
        fd = _open_nofollow(side, os.O_RDONLY)
        with os.fdopen(fd, "rb") as sf:
            raw = sf.read(MAX_HEADER_SIZE + 1)
        if len(raw) > MAX_HEADER_SIZE:
            return 0, empty, None
        meta = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return 0, empty, None
    if (not isinstance(meta, dict) or meta.get("peer") != peer
            or meta.get("size") != header.size or meta.get("sha256") != header.sha256.hex()):
        return 0, empty, None
    try:
        f = os.fdopen(_open_nofollow(part, os.O_RDWR), "r+b")
    except OSError:
        return 0, empty, None
    try:
        length = os.fstat(f.fileno()).st_size
        if not 0 < length <= header.size:
            f.close()
            return 0, empty, None
        h = _hash_prefix(f, length)
        if f.tell() != length:  # shrank meanwhile
            f.close()
            return 0, empty, None
    except BaseException:
        f.close()
        raise
    return length, h, f


def _open_partial(part: Path, side: Path, start: int, header: Header, peer: str,
                  resumed: IO[bytes] | None) -> IO[bytes]:
    """The partial file to write at ``start``: the one :func:`_resumable` opened (and
    hashed) when resuming, else a new file (whatever was at that path, e.g. a symlink,
    is removed, never followed). The sidecar is written the same way."""
    meta = {"peer": peer, "name": header.name, "size": header.size,
            "sha256": header.sha256.hex() if header.sha256 is not None else None}
    tmp = side.with_name(side.name + ".tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as tf:
            tf.write(json.dumps(meta))
        os.replace(tmp, side)
    except BaseException:
        if resumed is not None:
            resumed.close()
        raise
    if start and resumed is not None:
        resumed.truncate(start)  # exactly the verified prefix
        resumed.seek(start)
        return resumed
    if resumed is not None:
        resumed.close()
    if start:  # pragma: no cover - receive() accepts only 0 or the offset it offered
        raise TransferError("START at an offset that was not offered")
    with contextlib.suppress(FileNotFoundError):
        part.unlink()
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "r+b")


def _sync_close(f: IO[bytes]) -> None:
    try:
        f.flush()
        os.fsync(f.fileno())
    finally:
        f.close()
