"""The ``p2psc`` command (also ``python -m p2psc``): make a peer folder, exchange keys, and
try connections without writing code.

Subcommands: ``init``, ``pubkey``, ``fingerprint``, ``add-peer``, ``peers``,
``remove-peer``, ``listen``, ``send``, ``ping``, ``netcheck``, ``relay serve`` and
``directory ...``. Every subcommand takes ``--workdir DIR`` (the peer folder; default: the
current directory) and ``-v`` (debug logging, tracebacks on errors).
Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error, 130 Ctrl-C (143
SIGTERM); ``listen`` and ``relay serve`` exit 0 on either, their normal end.

Transfers of ``send`` and ``listen`` (see docs/CLI.md): the protocol of
:mod:`p2psc.transfer` (a header with name, size and SHA-256, the content in chunks, an end
message with the SHA-256, and the receiver's acknowledgement once the data is verified and
written); ``send`` exits 0 only on that acknowledgement. ``send --recv`` and other
applications use the raw convention: data messages of at most ``--chunk-size`` bytes,
never empty; an empty message marks the end, and the receiver answers it with its own
empty message once everything has been written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import math
import os
import queue
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from . import __version__, keys
from .config import PeerAddress, PeerStore, known_peers_json, read_config_file, write_peer_files
from .p2pexcept import ConfigError, P2PError
from .validators import check_host, check_peer_id, check_port, port_arg

if TYPE_CHECKING:  # (imported where used: `import p2psc.cli` stays light)
    from .channel import Channel
    from .p2phandler import P2PHandler

log = logging.getLogger("p2psc.cli")

__all__ = ["CHUNK_SIZE", "END_OF_TRANSFER", "PING_HELLO", "build_parser", "main"]

T = TypeVar("T")

PROG = "p2psc"
#: Default size of the messages ``send`` cuts a file into.
CHUNK_SIZE = 64 * 1024
#: The empty message: end of transfer (data messages are never empty).
END_OF_TRANSFER = b""
#: First message of ``p2psc ping``: ``listen`` answers it and echoes the rest of that channel.
PING_HELLO = b"\x00p2psc-ping-v1\x00"
PASSWORD_ENV = "P2PSC_PRIKEY_PASSWORD"
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
#: Exit code after Ctrl-C (128 + SIGINT); SIGTERM gives 143. ``listen`` and ``relay serve``
#: exit 0 on either: it is how they normally end.
EXIT_SIGINT = 128 + 2


class CliError(Exception):
    """A failure reported as one line on stderr (exit code 1)."""


# -- helpers ------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a non-negative number")
    return value


def _workdir(args: argparse.Namespace) -> Path:
    """The peer folder of ``--workdir``, checked to be one."""
    wd = Path(args.workdir)
    if not wd.is_dir():
        raise CliError(f"{wd}: no such folder")
    if not (wd / "conf" / "config.json").is_file():
        raise CliError(f"{wd}: not a peer folder (no conf/config.json); create one with "
                       f"'p2psc init {args.workdir} --peer-id ID'")
    return wd


def _ask_password_if_needed(conf: dict[str, Any]) -> None:
    """If the private key is encrypted and no password is configured, ask on the terminal."""
    if conf.get("my_prikey_password") is not None or os.environ.get(PASSWORD_ENV):
        return
    try:
        with open(conf["my_prikey_file"], "rb") as f:
            head = f.read(keys.MAX_KEY_FILE_SIZE)
    except (OSError, KeyError, TypeError, ValueError):
        return  # load_peer_config reports it
    if b"ENCRYPTED" in head and sys.stdin.isatty():
        os.environ[PASSWORD_ENV] = getpass.getpass("passphrase of the private key: ")


def _handler(args: argparse.Namespace) -> P2PHandler:
    """A P2PHandler for the peer folder (config errors become one line)."""
    from .p2phandler import P2PHandler
    wd = _workdir(args)
    conf = read_config_file(wd)
    _ask_password_if_needed(conf)
    return P2PHandler(config=conf)


def _peer_store(args: argparse.Namespace, *, lenient: bool = False
                ) -> tuple[dict[str, Any], PeerStore]:
    """The config and known peers, without loading the private key; with ``lenient`` (the
    commands that list and repair the peers) bad entries are in ``store.bad_entries``."""
    conf = read_config_file(_workdir(args))
    for k in ("known_peers_file", "peer_pubkey_path"):
        if not isinstance(conf.get(k), str) or not conf[k]:
            raise ConfigError(f"{conf['__config_file__']}: missing or empty {k!r}")
    return conf, PeerStore.load(Path(conf["known_peers_file"]), Path(conf["peer_pubkey_path"]),
                                lenient=lenient)


class UsageError(CliError):
    """A bad argument found after parsing: one line on stderr, exit code 2."""


def _own_identity(args: argparse.Namespace) -> tuple[str, Any]:
    """(peer id, private key) of the peer folder."""
    from .config import load_peer_config
    conf = read_config_file(_workdir(args))
    _ask_password_if_needed(conf)
    cfg = load_peer_config(conf)
    return cfg.peer_id, cfg.private_key


class _Worker:
    """Blocking reads and writes (stdin, stdout, files) in one daemon thread, so that the
    event loop never blocks on them and a read stuck on a terminal cannot hold up exit."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._run, daemon=True, name="p2psc-io").start()

    def _run(self) -> None:
        while True:
            loop, fut, func, a = self._jobs.get()
            try:
                result, exc = func(*a), None
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                result, exc = None, e
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(_settle, fut, result, exc)

    def run(self, func: Callable[..., T], *a: Any) -> Awaitable[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, func, a))
        return fut


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class _RawOut:
    """stdout written with ``os.write`` on its descriptor: nothing buffered in Python, and no
    lock that a worker thread blocked on a full pipe could hold at interpreter exit."""

    def __init__(self, stream: IO[str]):
        stream.flush()
        self.fd = stream.fileno()

    def write(self, data: bytes) -> None:
        with memoryview(data) as mv:
            pos = 0
            while pos < len(mv):
                pos += os.write(self.fd, mv[pos:])

    def flush(self) -> None:
        """Nothing is buffered."""


def _write_all(out: Any, data: bytes, flush: bool) -> None:
    out.write(data)
    if flush:
        out.flush()


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class _Progress:
    """A progress bar with rate on stderr, drawn at most ten times a second."""

    def __init__(self, total: int | None, stream: IO[str]):
        self.total = total
        self.stream = stream
        self.start = time.monotonic()
        self.last = 0.0
        self.done = 0

    def update(self, done: int, force: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6)
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = (f"[{bar:<30}] {frac * 100:5.1f}%  {_fmt_bytes(done)} / "
                    f"{_fmt_bytes(self.total)}  {_fmt_bytes(rate)}/s")
        else:
            text = f"{_fmt_bytes(done)}  {_fmt_bytes(rate)}/s"
        self.stream.write("\r" + text + "\033[K")
        self.stream.flush()

    def finish(self) -> None:
        self.update(self.done, force=True)
        self.stream.write("\n")
        self.stream.flush()


def _fmt_addr(addr: Any) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def _os_reason(exc: OSError) -> str:
    """An OSError's reason in words; a DNS failure (``gaierror``) in its own words, not
    ``os.strerror`` of its negative code ("Unknown error -2")."""
    from .p2pexcept import os_reason
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror or exc}"
    return os_reason(exc)


def _listen_error(host: str, port: int, exc: OSError, what: str = "") -> CliError:
    if isinstance(exc, socket.gaierror):
        return CliError(f"cannot listen on {host}:{port}{what}: cannot resolve {host}: "
                        f"{exc.strerror or exc}")
    return CliError(f"cannot listen on {host}:{port}{what}: {_os_reason(exc)}")


def _connect_error(handler: P2PHandler, peer_id: str, exc: OSError) -> CliError:
    from .p2pexcept import ConnectError
    if isinstance(exc, ConnectError):  # it says which peer, where and why
        return CliError(str(exc))
    addr = handler.config.peers.known_address(peer_id)
    where = f" at {addr.host}:{addr.port}" if addr is not None else ""
    return CliError(f"cannot connect to {peer_id}{where}: {_os_reason(exc)}")


async def _open(handler: P2PHandler, peer_id: str, timeout: float) -> Channel:
    try:
        return await handler.open_channel(peer_id, timeout=timeout or None)
    except OSError as exc:
        raise _connect_error(handler, peer_id, exc) from exc


# -- commands -----------------------------------------------------------------------------------

def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700, whatever the umask (a mode
    passed to mkdir is only ever narrowed by it); folders that exist are left as they are."""
    missing = []
    p = path
    while not p.is_dir() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            if not d.is_dir():
                raise


#: The public half of the peer's key, beside the private key (``p2psc pubkey`` reads it, so
#: it needs no passphrase), as in the demo folders.
PUBLIC_KEY_NAME = "public_key.pem"
CENTER_KEY_FILE = "p2psc_center.pubkey.pem"


def _import_key(path: str) -> tuple[Any, bytes | None]:
    """``init --import-key FILE``: (the RSA private key, the passphrase it was encrypted
    with, or None). The passphrase comes from $P2PSC_PRIKEY_PASSWORD or the terminal."""
    try:
        with open(path, "rb") as f:
            head = f.read(keys.MAX_KEY_FILE_SIZE)
    except OSError as exc:
        raise CliError(f"--import-key: {path}: {exc.strerror or exc}") from None
    password: bytes | None = None
    if b"ENCRYPTED" in head:
        env = os.environ.get(PASSWORD_ENV)
        if env:
            password = env.encode("utf-8")
        elif sys.stdin.isatty():
            password = getpass.getpass(f"passphrase of {path}: ").encode("utf-8")
        else:
            raise CliError(f"--import-key: {path} is encrypted; set {PASSWORD_ENV} to its "
                           "passphrase")
    keys_log = logging.getLogger("p2psc.keys")
    level = keys_log.level
    keys_log.setLevel(logging.ERROR)  # its mode warning would come before a parse error
    try:
        key = keys.load_private_key(path, password)
    except ConfigError as exc:
        raise CliError(f"--import-key: {exc}") from None
    finally:
        keys_log.setLevel(level)
    with contextlib.suppress(OSError):
        if os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s is accessible by group or others: the key may have been exposed "
                        "(the folder's copy is mode 0600)", path)
    return key, password


def _check_directory_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url) <= len("https://"):
        raise UsageError(f"init: --directory-url must be an http:// or https:// URL: {url!r}")
    return url


def cmd_init(args: argparse.Namespace) -> int:
    wd = Path(args.dir if args.dir is not None else args.workdir)
    check_peer_id(args.peer_id)
    check_host(args.host, "--host")
    if args.directory_url is not None:
        _check_directory_url(args.directory_url)
    if args.center_key is not None and args.directory_url is None:
        raise UsageError("init: --center-key needs --directory-url (the directory it signs for)")
    center = keys.load_public_key(args.center_key) if args.center_key is not None else None
    key_path = wd / "data" / "private_key.pem"
    conf_path = wd / "conf" / "config.json"
    for p in (key_path, conf_path):
        if p.exists():
            raise CliError(f"{p} already exists; not overwriting an existing peer folder")
    imported, import_password = (_import_key(args.import_key) if args.import_key is not None
                                 else (None, None))
    passphrase: bytes | None = import_password  # an imported key stays encrypted
    if args.passphrase:
        env = os.environ.get(PASSWORD_ENV)
        if env:
            passphrase = env.encode("utf-8")
        elif sys.stdin.isatty():
            first = getpass.getpass("passphrase for the new private key: ")
            if first != getpass.getpass("again: "):
                raise CliError("the passphrases do not match")
            if not first:
                raise CliError("empty passphrase")
            passphrase = first.encode("utf-8")
        else:
            raise CliError(f"--passphrase: no terminal to ask on; set {PASSWORD_ENV}")
    key = imported if imported is not None else keys.generate_private_key(args.bits)
    _make_private_dirs(wd / "conf")
    _make_private_dirs(wd / "data" / "pubkeys")
    keys.write_private_key(key_path, key, passphrase)  # 0600, refuses to overwrite
    write_peer_files([(wd / "data" / PUBLIC_KEY_NAME, keys.public_key_pem(key))])
    conf = {"my_prikey_file": "$[workdir]$/data/private_key.pem",
            "xconfig": "$[workdir]$/data/config.json",
            "known_peers_file": "$[workdir]$/data/peers.json",
            "peer_pubkey_path": "$[workdir]$/data/pubkeys"}
    if args.directory_url is not None:
        conf["find_peer_info_url"] = args.directory_url
    if center is not None:  # where the directory client looks for it (p2psc_center's key)
        write_peer_files([(wd / "data" / "pubkeys" / CENTER_KEY_FILE, keys.public_key_pem(center))])
    own = PeerAddress(args.peer_id, args.host, args.port).to_json()
    keys.atomic_write(conf_path, (json.dumps(conf, indent=2) + "\n").encode())
    keys.atomic_write(wd / "data" / "config.json", (json.dumps(own, indent=2) + "\n").encode())
    peers_file = wd / "data" / "peers.json"
    if not peers_file.exists():
        write_peer_files([(peers_file, known_peers_json({}))])
    print(f"created peer {args.peer_id} in {wd} ({args.host}:{args.port})")
    print(f"fingerprint: {keys.fingerprint(key)}" + (" (imported key)" if imported else ""))
    if args.directory_url is not None:
        print(f"directory: {args.directory_url}")
        if center is not None:
            print(f"center key: {keys.fingerprint(center)} (check it against the directory's "
                  "page)")
        else:
            print(f"no center key yet: copy the directory's {CENTER_KEY_FILE} into "
                  f"{wd / 'data' / 'pubkeys'}")
    if passphrase:
        print(f"the private key is encrypted: set {PASSWORD_ENV} when running p2psc or "
              "your application")
    print(f"give your public key to your peers: p2psc pubkey --workdir {wd} > "
          f"{args.peer_id}.pubkey.pem")
    return EXIT_OK


def _stored_public_key(args: argparse.Namespace) -> Any:
    """The public key beside the private key (data/public_key.pem), when present and
    consistent with it: equal to its public half when the private key is not encrypted, and
    not older than it when it is (then it cannot be checked without the passphrase)."""
    conf = read_config_file(_workdir(args))
    prikey = conf.get("my_prikey_file")
    if not isinstance(prikey, str) or not prikey:
        return None
    pub_path = Path(prikey).parent / PUBLIC_KEY_NAME
    try:
        pub_stat, pri_stat = pub_path.stat(), Path(prikey).stat()
        with open(prikey, "rb") as f:
            head = f.read(keys.MAX_KEY_FILE_SIZE)
    except OSError:
        return None
    pub = keys.load_public_key(pub_path)
    if b"ENCRYPTED" in head:
        return pub if pub_stat.st_mtime >= pri_stat.st_mtime else None
    if not keys.same_public_key(pub, keys.load_private_key(prikey).public_key()):
        raise CliError(f"{pub_path} does not match the private key {prikey}; delete it (or "
                       "write the right one with: p2psc pubkey > it, after deleting it)")
    return pub


def cmd_pubkey(args: argparse.Namespace) -> int:
    pub = _stored_public_key(args)
    if pub is None:
        _, pub = _own_identity(args)
    sys.stdout.write(keys.public_key_pem(pub).decode("ascii"))
    return EXIT_OK


def cmd_fingerprint(args: argparse.Namespace) -> int:
    if args.pubkey is not None:
        key = keys.load_public_key(args.pubkey)
        print(keys.fingerprint(key))
        return EXIT_OK
    peer_id, prikey = _own_identity(args)
    print(f"{peer_id}  {keys.fingerprint(prikey)}")
    return EXIT_OK


def cmd_add_peer(args: argparse.Namespace) -> int:
    # the rules of the known peers file's reader (validators), checked before anything is
    # written; a known peer needs a port it listens on (0 would be "never reachable")
    try:
        check_peer_id(args.peer_id, "ID")
        check_host(args.host, "--host")
        check_port(args.port, "--port")
    except ConfigError as exc:
        raise UsageError(f"add-peer: {exc}") from None
    conf, store = _peer_store(args, lenient=True)
    if args.pubkey == "-":
        pem, where = sys.stdin.buffer.read(keys.MAX_KEY_FILE_SIZE + 1), "stdin"
        key = keys.parse_public_key(pem, where)
    else:
        key = keys.load_public_key(args.pubkey)
    try:
        with open(conf["xconfig"], "rb") as f:
            own = json.loads(f.read()).get("peer_id")
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        own = None
    if own is not None and own == args.peer_id:
        raise CliError(f"{args.peer_id} is this peer's own id")
    old = store.pinned_key(args.peer_id)  # (a directory-sourced key counts, expired or not)
    if old is not None and not keys.same_public_key(old, key) and not args.replace:
        raise CliError(f"a different key is on file for {args.peer_id} "
                       f"({keys.fingerprint(old)}); use --replace to change it")
    store.add(PeerAddress(args.peer_id, args.host, args.port), key)
    print(f"added {args.peer_id} at {args.host}:{args.port}  {keys.fingerprint(key)}")
    return EXIT_OK


def cmd_peers(args: argparse.Namespace) -> int:
    _, store = _peer_store(args, lenient=True)
    for peer_id in store.known_ids():
        addr = store.address(peer_id)
        key = store.pinned_key(peer_id)
        fp = keys.fingerprint(key) if key is not None else "(no public key)"
        print(f"{peer_id}\t{addr.host}:{addr.port}\t{fp}")
    if not store.bad_entries:
        return EXIT_OK
    sys.stdout.flush()
    for peer_id, message in sorted(store.bad_entries.items()):
        print(f"{PROG}: bad entry {peer_id!r}: {' '.join(message.split())} (repair it with "
              f"'p2psc add-peer --replace {peer_id} ...' or 'p2psc remove-peer {peer_id}')",
              file=sys.stderr)
    return EXIT_FAIL


def cmd_remove_peer(args: argparse.Namespace) -> int:
    _, store = _peer_store(args, lenient=True)
    if not store.known_or_bad(args.peer_id):
        raise CliError(f"unknown peer {args.peer_id!r}: not in {store.known_peers_file}")
    store.remove(args.peer_id)
    print(f"removed {args.peer_id}")
    return EXIT_OK


async def _listen_udp(args: argparse.Namespace, handler: P2PHandler) -> int:
    """``listen --udp``: datagrams to stdout (or echoed); answers ``ping --udp``."""
    from .udp_p2p import UdpP2P

    io = _Worker()
    out = _RawOut(sys.stdout)
    stop: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def finish(code: int) -> None:
        if not stop.done():
            stop.set_result(code)

    def written(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and isinstance(fut.exception(), OSError):
            log.error("cannot write to stdout: %s", fut.exception())
            finish(EXIT_FAIL)

    class Listener(UdpP2P):
        def on_peer_handshaked(self, peer_id: str, addr: Any) -> None:
            log.info("%s: UDP session from %s", peer_id, _fmt_addr(addr))

        def on_recv(self, data: bytes, addr: Any) -> None:
            if args.echo or data.startswith(PING_HELLO):
                self.send(data, addr)
            elif data == END_OF_TRANSFER:
                asyncio.ensure_future(io.run(out.flush)).add_done_callback(written)
                self.send(END_OF_TRANSFER, addr)
            else:  # one worker thread: written in arrival order
                asyncio.ensure_future(io.run(_write_all, out, data, False)
                                      ).add_done_callback(written)

        def on_peer_closed(self, peer_id: str, error: Exception | None) -> None:
            log.info("%s: UDP session ended%s", peer_id, f" ({error})" if error else "")
            if args.once:
                finish(EXIT_OK if error is None else EXIT_FAIL)

    try:
        transport, _ = await handler.run_as_udp_server(Listener, host=args.host, port=args.port)
    except OSError as exc:
        host = args.host or handler.config.host
        port = handler.config.port if args.port is None else args.port
        raise _listen_error(host, port, exc, " (UDP)") from None
    print(f"{PROG}: {handler.get_myid()} listening on "
          f"{_fmt_addr(transport.get_extra_info('sockname'))} (UDP"
          f"{', echo' if args.echo else ''})", file=sys.stderr, flush=True)
    args.interrupt_code = EXIT_OK
    try:
        return await stop
    finally:
        await handler.close()
        with contextlib.suppress(OSError):
            await io.run(out.flush)


async def _listen(args: argparse.Namespace) -> int:
    handler = _handler(args)
    if args.udp:
        return await _listen_udp(args, handler)
    io = _Worker()
    out = _RawOut(sys.stdout)
    stop: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def finish(code: int) -> None:
        if not stop.done():
            stop.set_result(code)

    if args.out is not None and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out}: no such folder")
    out_dir = Path(args.out) if args.out is not None else None
    busy: set[str] = set()
    active = [0]
    stdout_lock = asyncio.Lock()

    async def write_stdout(data: bytes) -> None:
        await io.run(_write_all, out, data, False)

    async def flush_stdout() -> None:
        await io.run(_sync_stdout, out)

    async def on_transfer(ch: Any, header_msg: bytes) -> int:
        from . import transfer
        try:
            header = transfer.decode_header(header_msg)
        except transfer.TransferError as exc:
            _report(f"transfer from {ch.peer_id} FAILED: {exc}")
            await ch.send(transfer.encode_fail(str(exc)))
            return EXIT_FAIL
        if active[0] >= MAX_TRANSFERS:
            _report(f"transfer from {ch.peer_id} refused: {MAX_TRANSFERS} transfers running")
            await ch.send(transfer.encode_fail("the receiver is busy; try again later"))
            return EXIT_FAIL
        active[0] += 1
        try:
            if out_dir is not None:
                result = await transfer.receive(ch, header, peer=ch.peer_id, folder=out_dir,
                                                busy=busy)
            else:
                async with stdout_lock:  # one transfer at a time on stdout
                    result = await transfer.receive(ch, header, peer=ch.peer_id, folder=None,
                                                    write_stdout=write_stdout,
                                                    flush_stdout=flush_stdout)
        finally:
            active[0] -= 1
        _report(result.line())
        if result.output_closed:
            finish(EXIT_FAIL)
        return EXIT_OK if result.ok else EXIT_FAIL

    async def on_channel(ch: Any) -> None:
        log.info("%s connected from %s (%s)", ch.peer_id, ch.get_extra_info("peername"),
                 ch.suite)
        from .transfer import is_header
        echo = args.echo
        first = True
        code = EXIT_OK
        ended = True  # raw convention: no data since the last end-of-transfer mark
        try:
            async for msg in ch:
                if first and msg == PING_HELLO:
                    echo = True  # a ping: answer everything on this channel
                    await ch.send(msg)
                    first = False
                    continue
                if first and not echo and is_header(msg):
                    code = await on_transfer(ch, msg)
                    break
                first = False
                if echo:
                    await ch.send(msg)
                elif out_dir is not None:
                    _report(f"{ch.peer_id}: not a transfer header; closing (--out needs "
                            "'p2psc send')")
                    code = EXIT_FAIL
                    break
                elif msg == END_OF_TRANSFER:
                    await io.run(_sync_stdout, out)
                    await ch.send(END_OF_TRANSFER)
                    ended = True
                else:
                    ended = False
                    await io.run(_write_all, out, msg, False)
            if not ended:
                _report(f"data from {ch.peer_id} FAILED: the channel ended before the "
                        "end-of-transfer mark")
                code = EXIT_FAIL
        except BrokenPipeError:
            log.error("stdout is closed; stopping")
            finish(EXIT_FAIL)
            return
        except P2PError as exc:
            log.warning("%s: %s", ch.peer_id, exc)
            code = EXIT_FAIL
        finally:
            with contextlib.suppress(OSError):
                await io.run(out.flush)
        log.info("%s disconnected", ch.peer_id)
        if args.once:
            finish(code)

    try:
        server = await handler.serve(on_channel, host=args.host, port=args.port)
    except OSError as exc:
        host = args.host or handler.config.host
        port = handler.config.port if args.port is None else args.port
        raise _listen_error(host, port, exc) from None
    addrs = ", ".join(_fmt_addr(s.getsockname()) for s in server.sockets)
    print(f"{PROG}: {handler.get_myid()} listening on {addrs} (TCP"
          f"{', echo' if args.echo else ''})", file=sys.stderr, flush=True)
    args.interrupt_code = EXIT_OK  # Ctrl-C / SIGTERM is how listen normally ends
    try:
        return await stop
    finally:
        await handler.close()


#: Transfers one listener receives at once; more are refused (FAIL "busy").
MAX_TRANSFERS = 8


def _report(line: str) -> None:
    """One line about a transfer on stderr (always shown, not a log message)."""
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def _sync_stdout(out: _RawOut) -> None:
    """Flush stdout and, when it is a regular file, fsync it."""
    out.flush()
    try:
        regular = stat.S_ISREG(os.fstat(out.fd).st_mode)
    except OSError:
        return
    if regular:
        os.fsync(out.fd)


def cmd_listen(args: argparse.Namespace) -> int:
    if args.host is not None:
        check_host(args.host, "--host")
    return _run(_listen(args), args)


def _read_chunk(src: IO[bytes], size: int, regular: bool) -> bytes:
    if regular:
        return src.read(size)
    # a pipe or terminal: what is there, up to size; os.read takes no lock that could
    # block interpreter exit while this daemon thread waits on a terminal
    return os.read(src.fileno(), size)


def _open_source(name: str | None) -> tuple[IO[bytes], bool]:
    """The file to send (or stdin) and whether it must be closed."""
    if name in (None, "-"):
        return sys.stdin.buffer, False
    try:
        return open(name, "rb"), True
    except OSError as exc:
        raise CliError(f"{name}: {exc.strerror or exc}") from None


async def _send(args: argparse.Namespace, src: IO[bytes]) -> int:
    handler = _handler(args)
    try:
        try:
            st = os.fstat(src.fileno())
            regular = stat.S_ISREG(st.st_mode)
        except (OSError, ValueError, AttributeError):
            regular = False
        size = st.st_size if regular else None
        progress = (_Progress(size, sys.stderr)
                    if sys.stderr.isatty() and not args.quiet else None)
        io, out_io = _Worker(), _Worker()
        known = None
        if regular and not args.recv:  # hashed before connecting (no idle channel meanwhile)
            from .transfer import hash_file
            try:
                known = await io.run(hash_file, src)
            except OSError as exc:
                raise CliError(f"{args.file}: {_os_reason(exc)}") from None
        ch = await _open(handler, args.peer_id, args.timeout)
        if not args.recv:
            return await _send_file(args, ch, src, regular, io, progress, known)
        out = _RawOut(sys.stdout)

        async def replies() -> bool:
            """Write what comes back (with --recv); True when the peer ended the transfer."""
            async for msg in ch:
                if msg == END_OF_TRANSFER:
                    return True
                if args.recv:
                    await out_io.run(_write_all, out, msg, False)
            return False

        sent = 0
        try:
            reader = asyncio.ensure_future(replies())
            try:
                while True:
                    chunk = await io.run(_read_chunk, src, args.chunk_size, regular)
                    if not chunk:
                        break
                    if reader.done():  # the peer ended the channel before we did
                        reader.result()
                        raise CliError(f"{args.peer_id} closed the channel before the end of "
                                       "the transfer")
                    await ch.send(chunk)
                    sent += len(chunk)
                    if progress is not None:
                        progress.update(sent)
                await ch.send(END_OF_TRANSFER)
                acknowledged = await reader
            finally:
                reader.cancel()
                if reader.done() and not reader.cancelled():
                    reader.exception()  # retrieved: reported through the send path
            if args.recv:
                await out_io.run(out.flush)
        except P2PError as exc:
            from .channel import ChannelClosed
            if isinstance(exc, ChannelClosed):
                raise CliError(f"{args.peer_id} closed the channel before the end of the "
                               "transfer") from None
            raise
        finally:
            if progress is not None:
                progress.finish()
            await ch.close()
        if not acknowledged:
            raise CliError(f"the transfer was not acknowledged: {args.peer_id} closed the "
                           "channel")
        log.info("sent %d bytes to %s", sent, args.peer_id)
        return EXIT_OK
    finally:
        await handler.close()


async def _send_file(args: argparse.Namespace, ch: Channel, src: IO[bytes], regular: bool,
                     io: _Worker, progress: _Progress | None,
                     known: tuple[int, bytes] | None) -> int:
    """The transfer protocol (p2psc/transfer.py): exit 0 only on the receiver's ACK."""
    from . import transfer

    async def read(f: IO[bytes], size: int) -> bytes:
        return await io.run(_read_chunk, f, size, regular)

    name = None if args.file in (None, "-") else os.path.basename(args.file)
    try:
        total, start, sent = await transfer.send_stream(
            ch, src, name=name, regular=regular, chunk_size=args.chunk_size, read=read,
            on_progress=progress.update if progress is not None else None, known=known)
    except transfer.TransferError as exc:
        raise CliError(f"{args.peer_id}: {exc}") from None
    except P2PError as exc:
        raise CliError(f"the transfer was not acknowledged: {args.peer_id} ended the channel "
                       f"({exc})") from None
    finally:
        if progress is not None:
            progress.finish()
        await ch.close()
    log.info("sent %d bytes to %s (%d this run, resumed at %d); acknowledged, SHA-256 "
             "verified", total, args.peer_id, sent, start)
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    src, close_src = _open_source(args.file)
    try:
        return _run(_send(args, src), args)
    finally:
        if close_src:
            src.close()


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _ping_size_error(args: argparse.Namespace, handler: P2PHandler) -> str | None:
    """Why ``-s`` cannot be sent (checked before connecting), or None."""
    settings = handler.settings
    if args.udp:
        limit = settings.udp_max_payload - len(PING_HELLO)
        if args.size > limit:
            return (f"-s {args.size}: a UDP ping message holds at most {limit} bytes "
                    f"(udp_max_payload {settings.udp_max_payload}, less the "
                    f"{len(PING_HELLO)}-byte ping marker)")
    elif args.size > settings.max_message_size:
        return f"-s {args.size}: over max_message_size ({settings.max_message_size} bytes)"
    return None


async def _ping(args: argparse.Namespace) -> int:
    handler = _handler(args)
    rtts: list[float] = []
    sent = 0
    hs = 0.0
    try:
        too_large = _ping_size_error(args, handler)
        if too_large is not None:
            print(f"{PROG}: {too_large}", file=sys.stderr)
            return EXIT_USAGE
        settings = handler.settings
        if args.handshake_timeout is not None:
            hs_timeout = args.handshake_timeout or None
        else:
            hs_timeout = settings.udp_handshake_timeout if args.udp else settings.handshake_timeout
        addr = handler.config.peers.known_address(args.peer_id)
        t0 = time.perf_counter()
        if args.udp:
            try:
                ch: Any = await handler.open_datagram_channel(args.peer_id, timeout=hs_timeout)
            except OSError as exc:
                raise _connect_error(handler, args.peer_id, exc) from exc
            what = "UDP handshake"
        else:
            ch = await _open(handler, args.peer_id, hs_timeout or 0)
            what = f"connect and handshake, {ch.suite}"
        hs = (time.perf_counter() - t0) * 1000
        where = f" ({addr.host}:{addr.port})" if addr is not None else ""
        print(f"PING {args.peer_id}{where}: {what} {hs:.2f} ms, path {ch.path}", flush=True)
        async with ch:
            if not args.udp:  # over TCP the first message asks listen to echo the channel
                await ch.send(PING_HELLO)
                try:
                    await asyncio.wait_for(ch.recv(), args.timeout or None)
                except asyncio.TimeoutError:
                    raise CliError(f"{args.peer_id} does not answer (is it running "
                                   "'p2psc listen'?)") from None
            prefix = PING_HELLO if args.udp else b""  # over UDP every datagram says it
            for seq in range(1, args.count + 1):
                payload = prefix + struct.pack("!Q", seq) + bytes(max(args.size - 8, 0))
                sent += 1
                start = time.perf_counter()
                await ch.send(payload)
                deadline = start + (args.timeout or math.inf)
                reply = None
                while reply is None:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    try:
                        msg = await asyncio.wait_for(ch.recv(), None if math.isinf(left)
                                                     else left)
                    except asyncio.TimeoutError:
                        break
                    if msg.endswith(payload):  # an echo, or the README server's "recv:..."
                        reply = msg
                if reply is None:
                    print(f"no reply from {args.peer_id}: seq={seq}", flush=True)
                else:
                    rtt = (time.perf_counter() - start) * 1000
                    rtts.append(rtt)
                    print(f"{len(reply)} bytes from {args.peer_id}: seq={seq} "
                          f"time={rtt:.3f} ms path={ch.path}", flush=True)
                if seq < args.count and args.interval:
                    await asyncio.sleep(args.interval)
    finally:
        if sent:  # also when interrupted (exit 130), as ping does
            _ping_stats(args.peer_id, sent, rtts, hs)
        await handler.close()
    return EXIT_OK if rtts else EXIT_FAIL


def _ping_stats(peer_id: str, sent: int, rtts: list[float], hs: float) -> None:
    loss = 100.0 * (sent - len(rtts)) / sent
    print(f"--- {peer_id} ping statistics ---")
    print(f"{sent} sent, {len(rtts)} received, {loss:.0f}% loss; handshake {hs:.2f} ms")
    if rtts:
        s = sorted(rtts)
        avg = sum(s) / len(s)
        print(f"rtt min/avg/max/p99 = {s[0]:.3f}/{avg:.3f}/{s[-1]:.3f}/"
              f"{_percentile(s, 99):.3f} ms")
    sys.stdout.flush()


def cmd_ping(args: argparse.Namespace) -> int:
    return _run(_ping(args), args)


_BEHAVIOUR_NOTES = {
    "no nat": "no NAT: this address is public",
    "endpoint-independent": "endpoint-independent mapping (a \"cone\"): hole punching works "
                            "with most peers",
    "endpoint-dependent": "endpoint-dependent mapping (\"symmetric\"): a new port per "
                          "destination; punching works only toward an open or full-cone "
                          "peer, else the relay carries the traffic",
    "udp blocked": "UDP does not get out: UDP sessions go through the relay over TCP",
    "unknown": "unknown (one of the two probes went unanswered)",
}


async def _netcheck(args: argparse.Namespace) -> int:
    import socket as socket_mod

    from .udp_p2p import UdpP2P

    handler = _handler(args)
    try:
        nat = handler.nat
        if nat is None:
            raise CliError("no relay is configured: add \"relay\": {\"peer_id\": ..., "
                           "\"host\": ..., \"port\": ...} to conf/config.json (docs/NAT.md)")
        loop = asyncio.get_running_loop()
        sock = socket_mod.socket(socket_mod.AF_INET, socket_mod.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("0.0.0.0", 0))
            proto = UdpP2P(handler, handler.get_myid())
            proto.attach(sock)
            await loop.create_datagram_endpoint(lambda: proto, sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            report = await nat.netcheck(proto)
        finally:
            proto.stop()
    finally:
        await handler.close()
    print(f"relay:        {report.relay}")
    if report.error is not None:
        raise CliError(report.error)
    assert report.relay_rtt is not None
    print(f"relay RTT:    {report.relay_rtt * 1000:.2f} ms (over the control link)")
    print(f"TCP:          gets out; seen by the relay as {report.tcp_observed}")
    print(f"local UDP:    {report.local_udp or 'unknown'}")
    for i, mapping in enumerate(report.udp_mappings, 1):
        print(f"UDP mapping:  {mapping or 'no answer'} (seen by the relay's UDP port {i})")
    print(f"UDP:          {'blocked' if report.behaviour == 'udp blocked' else 'gets out'}")
    print(f"NAT:          {_BEHAVIOUR_NOTES.get(report.behaviour, report.behaviour)}")
    return EXIT_OK


def cmd_netcheck(args: argparse.Namespace) -> int:
    return _run(_netcheck(args), args)


async def _relay_serve(args: argparse.Namespace) -> int:
    """``relay serve``: the relay/rendezvous service of the peer folder, until interrupted."""
    from .nat.relay_server import RelayServer

    handler = _handler(args)
    relay = RelayServer(handler)
    host = args.host or handler.config.host
    port = handler.config.port if args.port is None else args.port
    try:
        await relay.start(host, port, args.udp_port, args.udp_port2)
    except OSError as exc:
        await handler.close()
        raise _listen_error(host, port, exc) from None
    except P2PError:
        await handler.close()
        raise
    print(f"{PROG} relay: {handler.get_myid()} listening on {relay.describe()}", flush=True)
    args.interrupt_code = EXIT_OK  # Ctrl-C / SIGTERM is how the relay normally ends
    try:
        await asyncio.get_running_loop().create_future()
        return EXIT_OK  # pragma: no cover - never set
    finally:
        await relay.close()
        await handler.close()


def cmd_relay_serve(args: argparse.Namespace) -> int:
    if args.host is not None:
        check_host(args.host, "--host")
    if not args.verbose:  # a service: its refusals and drops are worth seeing
        logging.getLogger("p2psc.relay").setLevel(logging.INFO)
    return _run(_relay_serve(args), args)


# -- running ------------------------------------------------------------------------------------

def _run(coro: Coroutine[Any, Any, int], args: argparse.Namespace) -> int:
    """Run ``coro`` on uvloop when installed, else the stdlib loop. SIGINT and SIGTERM cancel
    it; the exit code is then ``args.interrupt_code`` when the command set one (0 for the
    services, ``listen`` and ``relay serve``, whose normal end it is), else 128 + the signal
    number: 130 for Ctrl-C, 143 for SIGTERM (the shell's convention)."""
    interrupted: int | None = None

    async def wrapper() -> int:
        nonlocal interrupted
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def on_signal(sig: int) -> None:
            nonlocal interrupted
            interrupted = sig
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal, int(sig))
        try:
            return await coro
        except asyncio.CancelledError:
            if interrupted is not None:
                code = int(getattr(args, "interrupt_code", 128 + interrupted))
                if code != EXIT_OK:
                    print(f"{PROG}: interrupted", file=sys.stderr)
                return code
            raise

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        return asyncio.run(wrapper())
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(wrapper())
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # pragma: no cover - 3.10
    return asyncio.run(wrapper())  # pragma: no cover


# -- argument parsing ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``p2psc`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", default=".", metavar="DIR",
                        help="the peer folder (default: the current directory)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and a traceback on errors")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Authenticated, encrypted peer-to-peer channels: set up a peer "
        "folder, exchange keys, and send data between peers.",
        epilog="Exit codes: 0 success, 1 failure, 2 usage error, 130 interrupted (Ctrl-C), 143 "
        "terminated (SIGTERM; the services listen and serve exit 0). `p2psc COMMAND --help` gives "
        "each command's options; the p2psc README (its 'Command line' section) has a session.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("init", parents=[common], help="create a peer folder and its key",
                       description="Create a ready peer folder: conf/config.json, "
                       "data/config.json, data/peers.json, data/private_key.pem (mode 0600), "
                       "data/public_key.pem and data/pubkeys/. Refuses to overwrite an "
                       "existing key.")
    p.add_argument("dir", nargs="?", metavar="DIR", help="the folder (default: --workdir)")
    p.add_argument("--peer-id", required=True, metavar="ID", help="this peer's id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on and to give "
                   "to peers (default: 127.0.0.1)")
    p.add_argument("--port", type=port_arg, default=10098, help="port (default: 10098)")
    p.add_argument("--bits", type=int, default=3072, help="RSA key size (default: 3072)")
    p.add_argument("--passphrase", action="store_true",
                   help=f"encrypt the private key (asked on the terminal, or ${PASSWORD_ENV})")
    p.add_argument("--import-key", metavar="FILE",
                   help="use this PEM RSA private key instead of generating one (encrypted: "
                   f"its passphrase from ${PASSWORD_ENV} or the terminal; it stays encrypted)")
    p.add_argument("--directory-url", metavar="URL",
                   help="join a peer directory: its lookup URL (find_peer_info_url)")
    p.add_argument("--center-key", metavar="FILE",
                   help=f"the directory's center public key, installed as "
                   f"data/pubkeys/{CENTER_KEY_FILE} (check its fingerprint first)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("pubkey", parents=[common], help="print this peer's public key (PEM)",
                       description="Print this peer's public key (PEM) on stdout.")
    p.set_defaults(func=cmd_pubkey)

    p = sub.add_parser("fingerprint", parents=[common],
                       help="print this peer's key fingerprint",
                       description="Print the SHA-256 fingerprint of this peer's public key "
                       "(or of --pubkey FILE), to compare out loud.")
    p.add_argument("--pubkey", metavar="FILE", help="fingerprint this public key file instead")
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser("add-peer", parents=[common], help="add or update a known peer",
                       description="Add a known peer: its public key and its address.")
    p.add_argument("peer_id", metavar="ID")
    p.add_argument("--pubkey", required=True, metavar="FILE",
                   help="the peer's PEM public key ('-' for stdin)")
    p.add_argument("--host", required=True)
    p.add_argument("--port", required=True, type=port_arg)
    p.add_argument("--replace", action="store_true",
                   help="accept a key different from the one on file")
    p.set_defaults(func=cmd_add_peer)

    p = sub.add_parser("peers", parents=[common], help="list the known peers",
                       description="List the known peers: id, address, key fingerprint. A bad "
                       "entry of the known peers file is named on stderr (exit code 1).")
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("remove-peer", parents=[common], help="forget a known peer",
                       description="Remove a known peer: its entry in the known peers file "
                       "(valid or not) and its public key file.")
    p.add_argument("peer_id", metavar="ID")
    p.set_defaults(func=cmd_remove_peer)

    p = sub.add_parser("listen", parents=[common], help="serve and print what arrives",
                       description="Listen on this peer's address; write what arrives to "
                       "stdout (binary-safe), or echo it back with --echo. Answers "
                       "'p2psc ping'. Runs until interrupted (or --once).")
    p.add_argument("--echo", action="store_true", help="send every message back")
    p.add_argument("--udp", action="store_true", help="listen over UDP")
    p.add_argument("--once", action="store_true",
                   help="exit after the first channel ends (exit code 1 if it was lost)")
    p.add_argument("--host", default=None, help="override the listen address")
    p.add_argument("--port", type=port_arg, default=None, help="override the listen port")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="save each received file in DIR under its (sanitized) name, "
                   "verified before it gets that name; resumes interrupted transfers")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("send", parents=[common], help="send a file or stdin to a peer",
                       description="Send FILE (or stdin) to a peer running 'p2psc listen'; "
                       "exits 0 only once the receiver verified the SHA-256 and wrote the "
                       "data (exit 1 with the reason otherwise). With --recv, raw messages "
                       "instead, and what comes back is written to stdout. A progress bar "
                       "is shown when stderr is a terminal.")
    p.add_argument("peer_id", metavar="PEER_ID")
    p.add_argument("file", nargs="?", metavar="FILE", help="the file ('-' or none: stdin)")
    p.add_argument("--recv", action="store_true", help="write the replies to stdout")
    p.add_argument("--chunk-size", type=_positive_int, default=CHUNK_SIZE, metavar="BYTES",
                   help=f"message size (default: {CHUNK_SIZE})")
    p.add_argument("--timeout", type=_nonneg_float, default=10.0, metavar="SECONDS",
                   help="connect and handshake timeout (default: 10; 0: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("ping", parents=[common], help="measure handshake and round-trip times",
                       description="Connect to a peer (running 'p2psc listen') and measure "
                       "the handshake time and round-trip times (min/avg/max/p99).")
    p.add_argument("peer_id", metavar="PEER_ID")
    p.add_argument("-c", "--count", type=_positive_int, default=5, metavar="N",
                   help="round trips (default: 5)")
    p.add_argument("-i", "--interval", type=_nonneg_float, default=1.0, metavar="SECONDS",
                   help="pause between round trips (default: 1)")
    p.add_argument("-s", "--size", type=_positive_int, default=64, metavar="BYTES",
                   help="message size (default: 64)")
    p.add_argument("--timeout", type=_nonneg_float, default=5.0, metavar="SECONDS",
                   help="wait for each reply (default: 5; 0: none)")
    p.add_argument("--handshake-timeout", type=_nonneg_float, default=None, metavar="SECONDS",
                   help="connect and handshake limit (default: the peer folder's "
                   "udp_handshake_timeout with --udp, 15 s unless set; else its "
                   "handshake_timeout, 10 s unless set; 0: none)")
    p.add_argument("--udp", action="store_true", help="ping over UDP (listen --udp)")
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("netcheck", parents=[common],
                       help="what this network lets through: public mappings, NAT kind, relay",
                       description="Ask the relay named in conf/config.json how this peer is "
                       "seen: its TCP and UDP public addresses, whether its NAT maps per "
                       "destination, whether UDP gets out, and the relay's round-trip time.")
    p.set_defaults(func=cmd_netcheck)

    p = sub.add_parser("relay", help="run the NAT relay/rendezvous service",
                       description="The NAT relay/rendezvous service (docs/NAT.md): peers "
                       "whose key this peer folder knows (or its directory) attach to it to "
                       "learn their public UDP mapping, coordinate hole punching, and relay "
                       "datagrams and TCP circuits.")
    relay_sub = p.add_subparsers(dest="relay_command", metavar="COMMAND")
    relay_sub.required = True
    p = relay_sub.add_parser("serve", parents=[common], help="run the relay until interrupted",
                             description="Serve control links and circuits on one TCP port "
                             "and PROBEs on two UDP ports, until Ctrl-C or SIGTERM (exit 0). "
                             "Prints one line with the bound addresses.")
    p.add_argument("--host", default=None,
                   help="listen address (default: the peer folder's own host)")
    p.add_argument("--port", type=port_arg, default=None,
                   help="TCP port (default: the peer folder's own port; 0: any free port)")
    p.add_argument("--udp-port", type=port_arg, default=None, metavar="P1",
                   help="first PROBE port (default: the TCP port, or a free one with --port 0)")
    p.add_argument("--udp-port2", type=port_arg, default=None, metavar="P2",
                   help="second PROBE port (default: P1 + 1, or a free one)")
    p.set_defaults(func=cmd_relay_serve)

    from .directory.cli import add_directory_parser
    dp = add_directory_parser(sub)
    for action in dp._actions:  # give every directory command -v as well
        if isinstance(action, argparse._SubParsersAction):
            for leaf in action.choices.values():
                with contextlib.suppress(argparse.ArgumentError):
                    leaf.add_argument("-v", "--verbose", action="store_true",
                                      help="debug logging, and a traceback on errors")
    return parser


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("p2psc")
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: "
                                               "%(message)s"))
        logger.setLevel(logging.DEBUG)
    else:
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, (CliError, P2PError)):
        msg = str(exc)
    elif isinstance(exc, OSError):
        msg = str(exc.strerror or exc)
        if exc.filename:
            msg = f"{exc.filename}: {msg}"
    else:
        msg = f"unexpected error: {type(exc).__name__}: {exc}"
    return " ".join(msg.split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``p2psc`` console script; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for usage errors, 0 for --help / --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    verbose = bool(getattr(args, "verbose", False))
    if args.command != "directory" or verbose:
        _setup_logging(verbose)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:  # Ctrl-C outside the event loop (a passphrase prompt, ...)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # stdout is gone: do not complain at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
