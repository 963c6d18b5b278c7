"""``p2psc directory ...``: run and administer the peer directory.

The directory's state lives in a workdir: ``DIR/data/center_private_key.pem`` (the center's
signing key, mode 0600; ``--key`` overrides), ``DIR/data/p2psc_center.pubkey.pem`` (its public
half, to copy into every peer's ``peer_pubkey_path``) and ``DIR/data/directory.sqlite3``
(``--db`` overrides, with another file or a ``postgresql://`` URL). Exit codes: 0 success,
1 failure (one line on stderr), 2 usage error.

The main CLI calls :func:`add_directory_parser`; ``python -m p2psc.directory.cli directory ...``
runs the same commands standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .. import keys
from ..config import write_peer_files
from ..p2pexcept import ConfigError, P2PError
from ..validators import check_host, check_port, port_arg
from .record import CENTER_PEER_ID, DEFAULT_RECORD_TTL, MAX_RECORD_TTL, MIN_RECORD_TTL
from .workers import MAX_WORKERS, PASSWORD_ENV, center_key_password

__all__ = ["add_directory_parser", "main", "run"]

T = TypeVar("T")

CENTER_KEY_NAME = "center_private_key.pem"
CENTER_PUBKEY_NAME = CENTER_PEER_ID + keys.PUBKEY_SUFFIX
DB_NAME = "directory.sqlite3"


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.workdir) / "data"


def _db(args: argparse.Namespace) -> str:
    """``--db``: an SQLite file (default DIR/data/directory.sqlite3) or a PostgreSQL URL."""
    return str(args.db) if getattr(args, "db", None) else str(_data_dir(args) / DB_NAME)


def _postgres_options(args: argparse.Namespace) -> dict[str, Any]:
    """The PostgreSQL options given on the command line (only those given)."""
    given = {"pool_size": getattr(args, "db_pool", None),
             "timeout": getattr(args, "db_timeout", None)}
    return {k: v for k, v in given.items() if v is not None}


def _key_path(args: argparse.Namespace) -> Path:
    return Path(args.key) if getattr(args, "key", None) else _data_dir(args) / CENTER_KEY_NAME


def _with_backend(args: argparse.Namespace, use: Callable[[Any], Awaitable[T]]) -> T:
    """Open the store ``--db`` names, run ``use(backend)``, close it (one event loop)."""
    from .backend import open_backend  # sqlite3 or asyncpg only for the commands that need it

    async def go() -> T:
        backend = await open_backend(_db(args), **_postgres_options(args))
        try:
            return await use(backend)
        finally:
            await backend.close()
    return asyncio.run(go())


def _cmd_init_center(args: argparse.Namespace) -> int:
    key_path = _key_path(args)
    pub_path = key_path.parent / CENTER_PUBKEY_NAME
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # (umask may loosen it)
    key = keys.generate_private_key(args.bits)
    keys.write_private_key(key_path, key, center_key_password())  # mode 0600, refuses to overwrite
    write_peer_files([(pub_path, keys.public_key_pem(key))])
    print(f"center private key: {key_path}")
    print(f"center public key:  {pub_path}  ({keys.fingerprint(key)})")
    print(f"copy {pub_path.name} into every peer's peer_pubkey_path")
    return 0


def _serve_options(args: argparse.Namespace) -> Any:
    from .workers import ServeOptions
    return ServeOptions(db=_db(args), key_path=str(_key_path(args)), host=args.host,
                        port=args.port, max_skew=args.max_skew, record_ttl=args.record_ttl,
                        postgres=_postgres_options(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from .backend import is_postgres_url
    from .workers import load_center_key, serve_until_signal, supervise
    check_host(args.host, "--host")
    if args.workers != 1 and args.relay_workdir is not None:
        raise _UsageError("directory serve: --relay-workdir runs one relay, so it needs "
                          "--workers 1 (run `p2psc relay serve` beside the workers instead)")
    if _postgres_options(args) and not is_postgres_url(_db(args)):
        raise _UsageError("directory serve: --db-pool and --db-timeout are for a "
                          "postgresql:// --db")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    opts = _serve_options(args)
    key = load_center_key(opts)  # a wrong passphrase or a missing key: one line, exit 1

    if args.workers > 1:
        # the schema is created or migrated once, here, before any worker starts
        _with_backend(args, _nothing)
        try:
            return supervise(opts, args.workers, announce=lambda line: print(line, flush=True))
        except KeyboardInterrupt:
            return 0

    relay: Any = None  # the relay service, with --relay-workdir

    def ready(port: int, description: str) -> None:
        print(f"p2psc directory: http://{args.host}:{port}/  (lookups at "
              f"http://{args.host}:{port}/api/get_peer_info?id=PEER_ID; {description})",
              flush=True)
        if relay is not None:
            print(f"p2psc directory: relay {relay.handler.get_myid()} listening on "
                  f"{relay.describe()}", flush=True)

    async def start_relay() -> Any:
        nonlocal relay
        relay = await _start_relay(args)
        return relay

    try:
        asyncio.run(serve_until_signal(
            opts, key, ready=ready,
            also=start_relay if args.relay_workdir is not None else None))
    except KeyboardInterrupt:
        pass
    return 0


async def _nothing(_backend: Any) -> None:
    return None


async def _start_relay(args: argparse.Namespace) -> Any:
    """``serve --relay-workdir DIR``: the NAT relay service of the peer folder DIR, started in
    this process (on ``--host``, ``--relay-port`` or DIR's own port)."""
    from ..nat.relay_server import RelayServer
    from ..p2phandler import P2PHandler
    handler = P2PHandler(workdir=args.relay_workdir)
    relay = RelayServer(handler)
    port = handler.config.port if args.relay_port is None else args.relay_port
    try:
        await relay.start(args.host, port)
    except BaseException:
        await handler.close()
        raise
    return _RelayInProcess(relay)


class _RelayInProcess:
    """The relay service started by ``serve --relay-workdir``, closed with its handler."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.handler = relay.handler

    def describe(self) -> str:
        return str(self.relay.describe())

    async def close(self) -> None:
        await self.relay.close()
        await self.handler.close()


def _cmd_add(args: argparse.Namespace) -> int:
    pem = keys.public_key_pem(keys.load_public_key(args.pubkey)).decode("ascii")
    entry = _with_backend(args, lambda b: b.put(args.peer_id, pem, args.host, args.port))
    print(f"added {entry.peer_id} at {entry.host}:{entry.port} "
          f"({keys.fingerprint(keys.parse_public_key(pem.encode('ascii')))})")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    if not _with_backend(args, lambda b: b.remove(args.peer_id)):
        print(f"p2psc directory: peer {args.peer_id!r} is not registered", file=sys.stderr)
        return 1
    print(f"removed {args.peer_id}")
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from .backend import is_postgres_url
    from .pgstore import PostgresBackend
    from .store import open_store
    if is_postgres_url(args.from_db) or not is_postgres_url(args.to_db):
        raise _UsageError("directory migrate: --from is an SQLite file and --to a "
                          "postgresql:// URL")
    if not Path(args.from_db).is_file():
        raise ConfigError(f"{args.from_db}: no such SQLite directory database")
    _check_is_directory_database(args.from_db)
    with open_store(args.from_db) as source:
        peers, nonces = source.export()

    async def copy() -> None:
        target = await PostgresBackend.connect(args.to_db, **_postgres_options(args))
        try:
            await target.import_store(peers, nonces)
        finally:
            await target.close()
    asyncio.run(copy())
    from .pgstore import safe_url
    print(f"migrated {len(peers)} peer(s) and {len(nonces)} unexpired update nonce(s) from "
          f"{args.from_db} to {safe_url(args.to_db)}")
    return 0


def _check_is_directory_database(path: str) -> None:
    """Refuse, without writing to it, an SQLite file that is not a p2psc directory (opening
    it as a store would create the directory's tables in it)."""
    import sqlite3
    try:
        db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE "
                                               "type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: not a readable SQLite database: {exc}") from None
    if not {"peers", "seen_nonces"} <= tables:
        raise ConfigError(f"{path}: not a p2psc directory database (no peers and "
                          "seen_nonces tables)")


def _cmd_list(args: argparse.Namespace) -> int:
    entries = _with_backend(args, lambda b: b.list())
    for e in entries:
        try:
            fp = keys.fingerprint(keys.parse_public_key(e.pubkey.encode("ascii")))
        except P2PError:
            fp = "(unreadable key)"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.updated_at))
        print(f"{e.peer_id}\t{e.host}:{e.port}\t{fp}\t{when}")
    return 0


class _PeerFolder:
    """What ``lookup`` and ``update-address`` take from a peer folder (``--workdir``): the
    directory URL (find_peer_info_url), the center key (peer_pubkey_path/p2psc_center.pubkey.pem,
    where the handler's directory client finds it), the private key and the own record."""

    def __init__(self, workdir: str) -> None:
        from ..config import read_config_file
        if not (Path(workdir) / "conf" / "config.json").is_file():
            raise ConfigError(f"{workdir}: not a peer folder (no conf/config.json)")
        self.conf = read_config_file(workdir)
        self.where = str(self.conf["__config_file__"])

    def _path(self, name: str) -> Path:
        value = self.conf.get(name)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.where}: missing or empty {name!r}")
        return Path(value)

    def url(self) -> str:
        url = self.conf.get("find_peer_info_url")
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{self.where}: no find_peer_info_url (give --url, or set it: "
                              "p2psc init --directory-url)")
        return url

    def center_key_file(self) -> Path:
        return self._path("peer_pubkey_path") / CENTER_PUBKEY_NAME

    def prikey_file(self) -> Path:
        return self._path("my_prikey_file")

    def password(self) -> bytes | None:
        pw = self.conf.get("my_prikey_password")
        return pw.encode("utf-8") if isinstance(pw, str) and pw else _peer_password()

    def own_address(self) -> Any:
        from ..config import _parse_address, _read_json
        xconfig = self._path("xconfig")
        return _parse_address(_read_json(xconfig, "own peer record (xconfig)"), str(xconfig))


def _need(value: Any, option: str, command: str) -> Any:
    if value is None:
        raise _UsageError(f"directory {command}: give {option} or --workdir (a peer folder)")
    return value


class _UsageError(P2PError):
    """A missing option found after parsing (exit code 2)."""


def _cmd_lookup(args: argparse.Namespace) -> int:
    from .client import fetch_peer_record
    folder = _PeerFolder(args.workdir) if args.workdir is not None else None
    if folder is not None:
        args.url = args.url or folder.url()
        args.center_key = args.center_key or folder.center_key_file()
    _need(args.url, "--url", "lookup")
    center = keys.load_public_key(_need(args.center_key, "--center-key", "lookup"))
    rec = asyncio.run(fetch_peer_record(args.url, args.peer_id, center, timeout=args.timeout))
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.expires_at))
    print(f"{rec.peer_id}\t{rec.host}:{rec.port}\t{rec.fingerprint}\t(signature verified, "
          f"valid until {until})")
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    from .client import update_address, update_url_for
    folder = _PeerFolder(args.workdir) if args.workdir is not None else None
    password = _peer_password()
    if folder is not None:
        args.url = args.url or folder.url()
        if args.prikey is None:
            args.prikey, password = folder.prikey_file(), folder.password()
        if args.peer_id is None or args.host is None or args.port is None:
            own = folder.own_address()
            args.peer_id = args.peer_id or own.peer_id
            args.host = args.host or own.host
            args.port = own.port if args.port is None else args.port
    for value, option in ((args.peer_id, "PEER_ID"), (args.url, "--url"),
                          (args.prikey, "--prikey"), (args.host, "--host"),
                          (args.port, "--port")):
        _need(value, option, "update-address")
    check_host(args.host, "--host")
    check_port(args.port, "--port")
    key = keys.load_private_key(args.prikey, password)
    url = args.url if args.url.rstrip("/").endswith("/update_address") else update_url_for(args.url)
    asyncio.run(update_address(url, args.peer_id, key, args.host, args.port,
                               timeout=args.timeout))
    print(f"{args.peer_id} now at {args.host}:{args.port}")
    return 0


def _peer_password() -> bytes | None:
    pw = os.environ.get("P2PSC_PRIKEY_PASSWORD")
    return pw.encode("utf-8") if pw else None


def add_directory_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``directory`` command and its subcommands to an argparse ``subparsers`` object.

    Each leaf parser sets ``func``: the caller runs ``args.func(args)`` (or :func:`run`) and gets
    the exit code, 0 or 1; errors are already reported as one line on stderr.
    """
    p: argparse.ArgumentParser = subparsers.add_parser(
        "directory", help="run and administer the peer directory",
        description="Run and administer the p2psc peer directory.")
    sub = p.add_subparsers(dest="directory_command", metavar="COMMAND")
    sub.required = True

    def state_args(sp: argparse.ArgumentParser, key: bool = False) -> None:
        sp.add_argument("--workdir", default=".", metavar="DIR",
                        help="directory workdir; state in DIR/data (default: .)")
        sp.add_argument("--db", metavar="FILE|URL",
                        help=f"SQLite database file (default: DIR/data/{DB_NAME}) or a "
                             "PostgreSQL URL postgresql://USER@HOST[:PORT]/DBNAME (password "
                             "from $PGPASSWORD or ~/.pgpass; docs/DIRECTORY.md)")
        sp.add_argument("--db-pool", type=_pool_arg, default=None, metavar="N",
                        help="PostgreSQL: connections per process (default: 10)")
        sp.add_argument("--db-timeout", type=_seconds_arg, default=None, metavar="SECONDS",
                        help="PostgreSQL: time allowed to get a connection, and again for "
                             "each query, before the request is answered 503 (default: 3)")
        if key:
            sp.add_argument("--key", metavar="FILE",
                            help=f"center private key (default: DIR/data/{CENTER_KEY_NAME}); "
                                 f"passphrase from ${PASSWORD_ENV} if any")

    sp = sub.add_parser("init-center", help="create the center signing key")
    sp.add_argument("--workdir", default=".", metavar="DIR")
    sp.add_argument("--key", metavar="FILE",
                    help=f"where to write it (default: DIR/data/{CENTER_KEY_NAME})")
    sp.add_argument("--bits", type=int, default=3072, help="RSA key size (default: 3072)")
    sp.set_defaults(func=_guarded(_cmd_init_center))

    sp = sub.add_parser("serve", help="run the directory web server")
    state_args(sp, key=True)
    sp.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    sp.add_argument("--port", type=port_arg, default=9999, help="listen port (default: 9999)")
    sp.add_argument("--max-skew", type=int, default=120, metavar="SECONDS",
                    help="clock difference accepted on updates (default: 120)")
    sp.add_argument("--record-ttl", type=_ttl_arg, default=DEFAULT_RECORD_TTL, metavar="SECONDS",
                    help=f"validity of a signed record, {MIN_RECORD_TTL}-{MAX_RECORD_TTL} "
                         f"(default: {DEFAULT_RECORD_TTL}, 24 hours); a removed peer or a "
                         "replaced key is refused by every client within this time")
    sp.add_argument("--workers", type=_workers_arg, default=1, metavar="N",
                    help="server processes sharing the port (SO_REUSEPORT); a dead one is "
                         "started again (default: 1)")
    sp.add_argument("--relay-workdir", metavar="DIR", default=None,
                    help="also run the NAT relay service (docs/NAT.md) of the peer folder DIR "
                         "in this process, on --host")
    sp.add_argument("--relay-port", type=port_arg, default=None, metavar="P",
                    help="the relay's TCP port (default: DIR's own port); its UDP PROBE ports "
                         "are P and P + 1")
    sp.set_defaults(func=_guarded(_cmd_serve))

    sp = sub.add_parser("add", help="register a peer, or replace its key and address")
    sp.add_argument("peer_id", metavar="PEER_ID")
    sp.add_argument("--pubkey", required=True, metavar="FILE", help="the peer's PEM public key")
    sp.add_argument("--host", required=True)
    sp.add_argument("--port", required=True, type=port_arg)
    state_args(sp)
    sp.set_defaults(func=_guarded(_cmd_add))

    sp = sub.add_parser("remove", help="unregister a peer")
    sp.add_argument("peer_id", metavar="PEER_ID")
    state_args(sp)
    sp.set_defaults(func=_guarded(_cmd_remove))

    sp = sub.add_parser("migrate", help="copy an SQLite directory into an empty PostgreSQL one")
    sp.add_argument("--from", dest="from_db", required=True, metavar="FILE",
                    help="the SQLite database (e.g. DIR/data/directory.sqlite3)")
    sp.add_argument("--to", dest="to_db", required=True, metavar="URL",
                    help="the PostgreSQL database, postgresql://USER@HOST[:PORT]/DBNAME")
    sp.add_argument("--db-pool", type=_pool_arg, default=None, help=argparse.SUPPRESS)
    sp.add_argument("--db-timeout", type=_seconds_arg, default=None, metavar="SECONDS",
                    help="time allowed for each step (default: 3)")
    sp.set_defaults(func=_guarded(_cmd_migrate))

    sp = sub.add_parser("list", help="list the registered peers")
    state_args(sp)
    sp.set_defaults(func=_guarded(_cmd_list))

    peer_folder_help = ("a peer folder: the defaults of the other options come from it "
                        "(find_peer_info_url, its center key, its private key and own record)")
    sp = sub.add_parser("lookup", help="look a peer up and verify the center's signature")
    sp.add_argument("peer_id", metavar="PEER_ID")
    sp.add_argument("--workdir", metavar="DIR", default=None, help=peer_folder_help)
    sp.add_argument("--url", help="lookup URL (default: the folder's find_peer_info_url)")
    sp.add_argument("--center-key", metavar="FILE",
                    help="the center public key (default: the folder's "
                    f"peer_pubkey_path/{CENTER_PUBKEY_NAME})")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.set_defaults(func=_guarded(_cmd_lookup))

    sp = sub.add_parser("update-address", help="move your own entry to a new host and port")
    sp.add_argument("peer_id", metavar="PEER_ID", nargs="?",
                    help="your peer id (default: the folder's)")
    sp.add_argument("--workdir", metavar="DIR", default=None, help=peer_folder_help)
    sp.add_argument("--url",
                    help="lookup URL (find_peer_info_url) or the update_address URL "
                    "(default: the folder's find_peer_info_url)")
    sp.add_argument("--prikey", metavar="FILE",
                    help="your private key (passphrase from $P2PSC_PRIKEY_PASSWORD if any; "
                    "default: the folder's my_prikey_file)")
    sp.add_argument("--host", help="the new host (default: the folder's own record)")
    sp.add_argument("--port", type=port_arg, help="the new port (default: the folder's own record)")
    sp.add_argument("--timeout", type=float, default=5.0)
    sp.set_defaults(func=_guarded(_cmd_update))
    return p


def _ttl_arg(text: str) -> int:
    """argparse type of ``--record-ttl``: whole seconds in the accepted range."""
    return _int_in(text, MIN_RECORD_TTL, MAX_RECORD_TTL, " seconds")


def _pool_arg(text: str) -> int:
    """argparse type of ``--db-pool``."""
    return _int_in(text, 1, 1000)


def _workers_arg(text: str) -> int:
    """argparse type of ``--workers``."""
    return _int_in(text, 1, MAX_WORKERS)


def _int_in(text: str, low: int, high: int, unit: str = "") -> int:
    """A whole number from ``low`` to ``high`` (``unit``, e.g. " seconds", in the messages)."""
    try:
        value = int(text)
    except ValueError:
        of = f" of{unit}" if unit else ""
        raise argparse.ArgumentTypeError(f"not a whole number{of}: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be from {low} to {high}{unit}")
    return value


def _seconds_arg(text: str) -> float:
    """argparse type of ``--db-timeout``: positive seconds, at most an hour."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600 seconds")
    return value


def _guarded(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that errors become one line on stderr and exit code 1."""
    def func(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except _UsageError as exc:
            print(f"p2psc {exc}", file=sys.stderr)
            return 2
        except (P2PError, OSError) as exc:
            if isinstance(exc, P2PError):
                msg = str(exc)
            else:
                msg = str(exc.strerror or exc)
                if getattr(exc, "filename", None):
                    msg += f": {exc.filename}"
            print(f"p2psc directory: {msg}", file=sys.stderr)
            return 1
    func.__name__ = cmd.__name__
    return func


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``directory`` command and return its exit code (same as ``args.func(args)``)."""
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m p2psc.directory.cli directory COMMAND ...``."""
    parser = argparse.ArgumentParser(prog="p2psc")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    add_directory_parser(subparsers)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 for --help
        return int(exc.code or 0)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
