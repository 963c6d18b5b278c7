"""Peer configuration: ``conf/config.json`` and the files it names, loaded and checked at start-up.

A peer folder (the original layout)::

    conf/config.json        {"my_prikey_file": "$[workdir]$/data/private_key.pem", ...}
    data/config.json        {"peer_id": "test1.com", "host": "127.0.0.1", "port": 10098}
    data/peers.json         {"test2.com": {"peer_id": "test2.com", "host": "localhost", "port": 10099}}
    data/private_key.pem
    data/pubkeys/test2.com.pubkey.pem

Every mistake is reported as a :class:`ConfigError` naming the file and what is wrong.
This module is the only reader and writer of the known peers file and of the
``<peer_id>.pubkey.pem`` files (see :func:`read_known_peers` and :func:`peer_files`).
The reference of every key is in docs/CONFIG.md.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from . import keys, validators
from ._proto.settings import Settings
from .p2pexcept import ConfigError, UnknownPeerError

log = logging.getLogger("p2psc.config")

__all__ = ["DIRECTORY_CLOCK_SKEW", "Settings", "default_suite_name", "PeerAddress",
           "PeerConfig", "PeerStore", "read_config_file", "substitute", "load_peer_config",
           "config_from_cwd", "config_from_appublic", "case_twin", "pubkey_file",
           "read_public_key", "read_known_peers", "known_peers_json", "peer_files",
           "write_peer_files", "CONFIG_KEYS", "known_config_keys", "warn_unknown_keys"]

#: Largest JSON config file read (peers.json with thousands of peers stays far below).
MAX_JSON_FILE_SIZE = 16 * 1024 * 1024
_VAR_RE = re.compile(r"\$\[(.*?)\]\$")
#: Seconds a directory record (and a key learned from one) stays usable after its
#: ``expires_at``, for clock differences with the center (p2psc.directory.record.CLOCK_SKEW).
DIRECTORY_CLOCK_SKEW = 300


@functools.lru_cache(maxsize=1)
def _cpu_has_aes() -> bool:
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64") and platform.system() == "Darwin":
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return "aes" in line.split(":", 1)[-1].split()
    except OSError:
        pass
    return False


def default_suite_name() -> str:
    """AES-256-GCM where the CPU has AES instructions (as TLS libraries choose), else
    ChaCha20-Poly1305."""
    return "aes-256-gcm" if _cpu_has_aes() else "chacha20-poly1305"


@dataclass(frozen=True)
class PeerAddress:
    """A peer's id and where to reach it."""

    peer_id: str
    host: str
    port: int
    #: the directory record's time, for a peer learned from the directory: a record older
    #: than the one on file is refused (no rollback to an older address). A key that the
    #: directory retired can still be served until its record expires (``expires_at``).
    updated_at: int | None = field(default=None, compare=False)
    #: the end of the directory record's validity (unix seconds), for a peer learned from the
    #: directory: after it (+ DIRECTORY_CLOCK_SKEW) the key is not used for a handshake until
    #: a fresh record is fetched. Absent for peers added by hand, which never expire.
    expires_at: int | None = field(default=None, compare=False)

    @property
    def from_directory(self) -> bool:
        """Learned from the directory (it has the record's ``updated_at`` or ``expires_at``)."""
        return self.updated_at is not None or self.expires_at is not None

    def expired(self, now: float) -> bool:
        """Whether this is a directory-sourced entry whose record is no longer valid at
        ``now`` (unix seconds): past ``expires_at`` + DIRECTORY_CLOCK_SKEW, or learned from a
        v1 record without ``expires_at``. Entries added by hand never expire."""
        if not self.from_directory:
            return False
        return self.expires_at is None or now > self.expires_at + DIRECTORY_CLOCK_SKEW

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"peer_id": self.peer_id, "host": self.host, "port": self.port}
        if self.updated_at is not None:
            record["updated_at"] = self.updated_at
        if self.expires_at is not None:
            record["expires_at"] = self.expires_at
        return record


def _parse_address(obj: Any, where: str, expected_id: str | None = None) -> PeerAddress:
    """A ``{"peer_id", "host", "port"[, "updated_at"][, "expires_at"]}`` record (the own record
    of xconfig, or an entry of the known peers file), checked with :mod:`p2psc.validators`."""
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: expected an object with peer_id, host and port")
    peer_id = obj.get("peer_id", expected_id)
    try:
        validators.check_peer_id(peer_id)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if expected_id is not None and peer_id != expected_id:
        raise ConfigError(f"{where}: entry {expected_id!r} has peer_id {peer_id!r}")
    host = validators.check_host(obj.get("host"), f"{where}: peer {peer_id}: host")
    # port 0: listen on a free port (own record), or a peer that never listens (known peers)
    port = validators.check_port(obj.get("port"), f"{where}: peer {peer_id}: port", allow_zero=True)
    times = {}
    for name in ("updated_at", "expires_at"):
        value = obj.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}: peer {peer_id}: {name} must be a whole number")
        times[name] = value
    return PeerAddress(peer_id, host, port, **times)


def _read_json(path: Path, what: str) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_FILE_SIZE:
            raise ConfigError(f"{path}: {what} is {size} bytes, over the {MAX_JSON_FILE_SIZE} limit")
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: {what} is not valid JSON: {exc}") from None


def substitute(value: Any, namespace: Mapping[str, str], where: str) -> Any:
    """Replace ``$[name]$`` in every string of ``value`` (recursively), as appPublic does
    for ``workdir``, ``ProgramPath`` and ``home``; an unknown name is a :class:`ConfigError`."""
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in namespace:
                raise ConfigError(f"{where}: unknown variable $[{name}]$ "
                                  f"(known: {', '.join(sorted(namespace))})")
            return namespace[name]
        return _VAR_RE.sub(repl, value)
    if isinstance(value, list):
        return [substitute(v, namespace, where) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, namespace, where) for k, v in value.items()}
    return value


def _program_path() -> str:
    """The folder of the running program, as appPublic's ``ProgramPath()`` computes it."""
    if getattr(sys, "frozen", False):
        return os.path.dirname(os.path.abspath(sys.executable))
    return os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv and sys.argv[0] else "."))


def read_config_file(workdir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``<workdir>/conf/config.json`` with ``$[workdir]$``, ``$[ProgramPath]$`` and
    ``$[home]$`` substituted (plain text replacement: nothing is evaluated); appPublic's
    process-wide singleton is not touched."""
    wd = os.path.abspath(os.fspath(workdir))
    path = Path(wd, "conf", "config.json")
    raw = _read_json(path, "config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a JSON object")
    namespace = {"workdir": wd, "ProgramPath": _program_path(), "home": str(Path.home())}
    conf: dict[str, Any] = substitute(raw, namespace, str(path))
    conf["__config_file__"] = str(path)
    return conf


def config_from_cwd() -> dict[str, Any]:
    """The config of ``P2PHandler()`` with no argument: ``./conf/config.json`` of the current
    folder, read by :func:`read_config_file` with the variables appPublic's ``getConfig()``
    offers (``workdir`` = the current folder, ``ProgramPath``, ``home``).

    It does not call appPublic's ``getConfig()``, whose ``$[...]$`` expressions are evaluated
    as Python (a config file could run code), and does not read its singleton. An application
    that calls ``getConfig()`` itself (as the original README's demo does) gets appPublic's
    behaviour for that call; p2psc reads the file again, as text.
    """
    try:
        cwd = os.getcwd()
    except OSError as exc:
        raise ConfigError(f"cannot read conf/config.json: no current folder ({exc.strerror or exc})"
                          ) from None
    path = Path(cwd, "conf", "config.json")
    if not path.exists():
        raise ConfigError(f"{path}: config file not found (run from a peer folder, or pass "
                          "workdir=)")
    return read_config_file(cwd)


#: The former name (it used to call appPublic's ``getConfig()``): the same function.
config_from_appublic = config_from_cwd


# -- the known peers file and the public key files -------------------------------------------
# The only code that reads or writes them: PeerStore (start-up, ``p2psc add-peer``, the
# handler's directory lookups), p2psc.directory.save_peer and ``p2psc init`` all use these
# functions, so both files have one format and one set of checks.

def case_twin(peer_id: str, known: Iterable[str]) -> str | None:
    """An id of ``known`` that differs from ``peer_id`` only in case, or None.

    Peer ids are case-sensitive, but ``Alice.pubkey.pem`` and ``alice.pubkey.pem`` are one
    file on case-insensitive file systems (macOS, Windows): one peer's key would be read, or
    overwritten, as the other's. So p2psc never holds two such ids: the second one is refused
    (``ConfigError``) when the known peers file or the key folder is read, and when a peer is
    added (``p2psc add-peer``, a directory lookup).
    """
    folded = peer_id.lower()  # (ids are ASCII)
    for other in known:
        if other != peer_id and other.lower() == folded:
            return other
    return None


def _refuse_case_twin(peer_id: str, known: Iterable[str], where: str) -> None:
    twin = case_twin(peer_id, known)
    if twin is not None:
        raise ConfigError(f"{where}: peer id {peer_id!r} differs only in case from the known "
                          f"peer {twin!r}; both would be one key file on macOS and Windows")


def _refuse_case_twins(ids: Iterable[str], where: str) -> None:
    seen: dict[str, str] = {}
    for peer_id in ids:
        first = seen.setdefault(peer_id.lower(), peer_id)
        if first != peer_id:
            _refuse_case_twin(peer_id, [first], where)


def _key_file_ids(peer_pubkey_path: Path) -> list[str]:
    """The ids of the ``*.pubkey.pem`` files in the folder, as stored (exact case)."""
    n = len(keys.PUBKEY_SUFFIX)
    return [name[:-n] for name in os.listdir(peer_pubkey_path) if name.endswith(keys.PUBKEY_SUFFIX)]


def pubkey_file(peer_pubkey_path: Path, peer_id: str) -> Path:
    """``<peer_pubkey_path>/<peer_id>.pubkey.pem`` (:class:`ConfigError` for an invalid id)."""
    return Path(peer_pubkey_path) / (validators.check_peer_id(peer_id) + keys.PUBKEY_SUFFIX)


def read_public_key(peer_pubkey_path: Path, peer_id: str) -> rsa.RSAPublicKey | None:
    """The public key on file for ``peer_id``, or None when it has no key file.

    Only a file named with the id's exact case counts (on macOS and Windows, ``alice`` would
    otherwise open ``Alice.pubkey.pem``), and a key file of an id that differs only in case
    is a :class:`ConfigError` (:func:`case_twin`). Lists the folder: blocking.
    """
    path = pubkey_file(peer_pubkey_path, peer_id)
    try:
        on_file = _key_file_ids(Path(peer_pubkey_path))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise ConfigError(f"{peer_pubkey_path}: cannot list the key folder: "
                          f"{exc.strerror or exc}") from None
    _refuse_case_twin(peer_id, on_file, str(peer_pubkey_path))
    if peer_id not in on_file:
        return None
    return keys.load_public_key(path)


def _read_public_keys(peer_pubkey_path: Path, bad: dict[str, str] | None = None
                      ) -> dict[str, rsa.RSAPublicKey]:
    """Every ``<peer_id>.pubkey.pem`` of the folder (files not named by a valid id are skipped).
    With ``bad``, an unreadable key file is recorded there (id -> message) instead of raised."""
    public_keys: dict[str, rsa.RSAPublicKey] = {}
    for path in sorted(peer_pubkey_path.glob("*" + keys.PUBKEY_SUFFIX)):
        peer_id = path.name[: -len(keys.PUBKEY_SUFFIX)]
        try:
            validators.check_peer_id(peer_id)
        except ConfigError:
            log.warning("%s: ignored: the file name is not a valid peer id", path)
            continue
        try:
            public_keys[peer_id] = keys.load_public_key(path)
        except ConfigError as exc:
            if bad is None:
                raise
            bad[peer_id] = str(exc)
    _refuse_case_twins(public_keys, str(peer_pubkey_path))
    return public_keys


def read_known_peers(known_peers_file: Path, *, missing_ok: bool = False) -> dict[str, PeerAddress]:
    """The known peers file: peer id -> address, every entry checked.

    A missing file is a :class:`ConfigError`, or no peers with ``missing_ok``.
    """
    path = Path(known_peers_file)
    if missing_ok and not path.exists():
        return {}
    addresses, bad = _read_known_peers(path)
    for pid, (_, message) in bad.items():
        raise ConfigError(f"{message}{_repair_hint(pid)}")
    _refuse_case_twins(addresses, str(path))
    return addresses


def _repair_hint(peer_id: str) -> str:
    """How to repair a bad entry of the known peers file (both commands work on it)."""
    return (f" (repair the entry with 'p2psc add-peer --replace {peer_id} ...' or "
            f"'p2psc remove-peer {peer_id}')")


def _read_known_peers(path: Path) -> tuple[dict[str, PeerAddress], dict[str, tuple[Any, str]]]:
    """The known peers file: (valid entries, bad entries as id -> (raw record, error message
    naming the file and the entry)). Whole-file problems raise :class:`ConfigError`."""
    raw = _read_json(path, "known peers file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a JSON object of peer id -> record")
    addresses: dict[str, PeerAddress] = {}
    bad: dict[str, tuple[Any, str]] = {}
    for pid, rec in raw.items():
        try:
            addresses[pid] = _parse_address(rec, str(path), pid)
        except ConfigError as exc:
            msg = str(exc)
            if repr(pid) not in msg and f"peer {pid}:" not in msg:
                msg = f"{path}: entry {pid!r}: {msg.removeprefix(f'{path}: ')}"
            bad[pid] = (rec, msg)
    return addresses, bad


def known_peers_json(addresses: Mapping[str, PeerAddress],
                     kept: Mapping[str, Any] | None = None) -> bytes:
    """The contents of a known peers file holding ``addresses`` (the one format written),
    and ``kept``: entries that did not pass the checks, written back as they were read (so
    that repairing one entry never silently drops another)."""
    table: dict[str, Any] = {pid: rec for pid, rec in (kept or {}).items()
                             if pid not in addresses}
    table.update({pid: a.to_json() for pid, a in addresses.items()})
    return (json.dumps(table, indent=2, sort_keys=True) + "\n").encode()


def peer_files(peer_pubkey_path: Path, known_peers_file: Path, addresses: Mapping[str, PeerAddress],
               address: PeerAddress, public_key: rsa.RSAPublicKey | None, *,
               key_ids: Iterable[str] = (), kept: Mapping[str, Any] | None = None
               ) -> list[tuple[Path, bytes]]:
    """The files to write so that ``address`` joins (or replaces its entry in) ``addresses``:
    the peer's public key file (left out when ``public_key`` is None), then the known peers
    file. ``address`` is checked as the reader will check it, and refused when its id differs
    only in case from one of ``addresses`` or ``key_ids`` (ids with a key file); ``kept``:
    bad entries to write back unchanged (:func:`known_peers_json`); see :func:`write_peer_files`."""
    _parse_address(address.to_json(), str(known_peers_file), address.peer_id)
    _refuse_case_twin(address.peer_id, [*addresses, *key_ids], str(known_peers_file))
    files: list[tuple[Path, bytes]] = []
    if public_key is not None:
        files.append((pubkey_file(peer_pubkey_path, address.peer_id), keys.public_key_pem(public_key)))
    files.append((Path(known_peers_file),
                  known_peers_json({**addresses, address.peer_id: address}, kept)))
    return files


def write_peer_files(files: list[tuple[Path, bytes]]) -> None:
    """Write files from :func:`peer_files` in order, each atomically, mode 0644 (blocking)."""
    for path, data in files:
        keys.atomic_write(path, data, 0o644)


class PeerStore:
    """The peers this peer knows: their addresses (``known_peers_file``) and public keys
    (``peer_pubkey_path``), held in memory after start-up so no file is read on the event loop."""

    def __init__(self, known_peers_file: Path, peer_pubkey_path: Path,
                 addresses: dict[str, PeerAddress], public_keys: dict[str, rsa.RSAPublicKey],
                 *, bad_entries: dict[str, str] | None = None,
                 kept: dict[str, Any] | None = None):
        self.known_peers_file = known_peers_file
        self.peer_pubkey_path = peer_pubkey_path
        self._addresses = addresses
        self._public_keys = public_keys
        #: entries of the known peers file that did not pass the checks (id -> error message),
        #: only with ``load(..., lenient=True)``: the commands that list and repair them
        self.bad_entries: dict[str, str] = dict(bad_entries or {})
        #: their raw records, written back unchanged when another entry is written
        self._kept: dict[str, Any] = dict(kept or {})
        #: unix time, for the expiry of directory-sourced keys (replaceable in tests)
        self.clock: Callable[[], float] = time.time

    @classmethod
    def load(cls, known_peers_file: Path, peer_pubkey_path: Path, *,
             lenient: bool = False) -> PeerStore:
        """Read the known peers file and every ``*.pubkey.pem`` in the public key folder.

        A bad entry (or a known peer without a readable key file) is a :class:`ConfigError`
        naming the file and the entry, and how to repair it; with ``lenient`` (the commands
        that list and repair the peers) it is left out and recorded in :attr:`bad_entries`.
        """
        if not peer_pubkey_path.is_dir():
            raise ConfigError(f"{peer_pubkey_path}: peer_pubkey_path is not a folder")
        if not lenient:
            addresses = read_known_peers(known_peers_file)
            public_keys = _read_public_keys(peer_pubkey_path)
            for peer_id in addresses:
                if peer_id not in public_keys:
                    raise ConfigError(f"{known_peers_file}: known peer {peer_id} has no public "
                                      f"key file {pubkey_file(peer_pubkey_path, peer_id)}"
                                      f"{_repair_hint(peer_id)}")
            return cls(known_peers_file, peer_pubkey_path, addresses, public_keys)
        addresses, bad = _read_known_peers(Path(known_peers_file))
        bad_keys: dict[str, str] = {}
        public_keys = _read_public_keys(peer_pubkey_path, bad_keys)
        _refuse_case_twins(addresses, str(known_peers_file))
        bad_entries = {pid: message for pid, (_, message) in bad.items()}
        for peer_id in list(addresses):
            if peer_id in bad_keys or peer_id not in public_keys:
                bad_entries[peer_id] = bad_keys.get(peer_id) or (
                    f"{known_peers_file}: known peer {peer_id} has no public key file "
                    f"{pubkey_file(peer_pubkey_path, peer_id)}")
                bad[peer_id] = (addresses.pop(peer_id).to_json(), "")
        return cls(known_peers_file, peer_pubkey_path, addresses, public_keys,
                   bad_entries=bad_entries, kept={pid: rec for pid, (rec, _) in bad.items()})

    def public_key(self, peer_id: str) -> rsa.RSAPublicKey | None:
        """The peer's public key for a handshake, or None when it is not known, or when it was
        learned from the directory and its record has expired (:meth:`PeerAddress.expired`):
        then the handler looks the peer up again before trusting a key for it."""
        addr = self._addresses.get(peer_id)
        if addr is not None and addr.expired(self.clock()):
            return None
        return self._public_keys.get(peer_id)

    def pinned_key(self, peer_id: str) -> rsa.RSAPublicKey | None:
        """The public key on file for the peer, expired or not: what a new directory record is
        compared with (the key-change policy), never used for a handshake by itself."""
        return self._public_keys.get(peer_id)

    def address(self, peer_id: str) -> PeerAddress:
        """The peer's address; :class:`UnknownPeerError` when it is not a known peer."""
        try:
            return self._addresses[peer_id]
        except KeyError:
            raise UnknownPeerError(f"unknown peer {peer_id!r}: not in {self.known_peers_file}") from None

    def known_ids(self) -> list[str]:
        return sorted(self._addresses)

    def known_address(self, peer_id: str) -> PeerAddress | None:
        """The peer's address, or None when it is not a known peer."""
        return self._addresses.get(peer_id)

    def files_for(self, address: PeerAddress, public_key: rsa.RSAPublicKey
                  ) -> list[tuple[Path, bytes]]:
        """The file contents that record ``address`` and ``public_key`` (:func:`peer_files`)."""
        return peer_files(self.peer_pubkey_path, self.known_peers_file, self._addresses,
                          address, public_key, key_ids=self._public_keys, kept=self._kept)

    def known_or_bad(self, peer_id: str) -> bool:
        """Whether the known peers file has an entry ``peer_id``, valid or not."""
        return peer_id in self._addresses or peer_id in self._kept

    def remove(self, peer_id: str) -> None:
        """Remove a known peer (a valid or a bad entry) from the known peers file, then delete
        its public key file (blocking). :class:`UnknownPeerError` when there is no such entry."""
        if not self.known_or_bad(peer_id):
            raise UnknownPeerError(f"unknown peer {peer_id!r}: not in {self.known_peers_file}")
        addresses = {pid: a for pid, a in self._addresses.items() if pid != peer_id}
        kept = {pid: rec for pid, rec in self._kept.items() if pid != peer_id}
        write_peer_files([(Path(self.known_peers_file), known_peers_json(addresses, kept))])
        self._addresses, self._kept = addresses, kept
        self.bad_entries.pop(peer_id, None)
        self._public_keys.pop(peer_id, None)
        try:
            path = pubkey_file(self.peer_pubkey_path, peer_id)
        except ConfigError:
            return  # an invalid id has no key file
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ConfigError(f"{path}: cannot delete the public key file: "
                              f"{exc.strerror or exc}") from None

    @staticmethod
    def write_files(files: list[tuple[Path, bytes]]) -> None:
        """Write files atomically (blocking: the handler runs this in a thread)."""
        write_peer_files(files)

    def add(self, address: PeerAddress, public_key: rsa.RSAPublicKey, *, persist: bool = True) -> None:
        """Add or update a known peer in memory and, with ``persist``, on disk (atomic writes).

        The caller decides whether a changed public key is acceptable.
        """
        validators.check_peer_id(address.peer_id)
        _refuse_case_twin(address.peer_id, [*self._addresses, *self._public_keys],
                          str(self.known_peers_file))
        if persist:
            self.write_files(self.files_for(address, public_key))
            self._kept.pop(address.peer_id, None)
            self.bad_entries.pop(address.peer_id, None)
        self._public_keys[address.peer_id] = public_key
        self._addresses[address.peer_id] = address


@dataclass
class PeerConfig:
    """Everything a peer needs to run: its identity, its known peers and its settings."""

    peer_id: str
    host: str
    port: int
    private_key: rsa.RSAPrivateKey
    peers: PeerStore
    settings: Settings
    find_peer_info_url: str | None
    config_file: str
    xconfig_file: str
    #: the relay/rendezvous service (the "relay" key; docs/NAT.md), or None
    relay: PeerAddress | None = None


_REQUIRED = ("my_prikey_file", "xconfig", "known_peers_file", "peer_pubkey_path")
#: The keys of conf/config.json that are not settings (docs/CONFIG.md).
CONFIG_KEYS = (*_REQUIRED, "my_prikey_password", "find_peer_info_url", "relay")


def known_config_keys() -> list[str]:
    """Every key conf/config.json may have: the files, the directory, the relay, and the
    settings (:class:`~p2psc._proto.settings.Settings`)."""
    from dataclasses import fields
    return [*CONFIG_KEYS, *(f.name for f in fields(Settings))]


def warn_unknown_keys(conf: Mapping[str, Any], where: str) -> list[str]:
    """Log a warning for each key of ``conf`` that p2psc does not know (a typo such as
    ``max_mesage_size`` would otherwise be ignored without a word), with the closest known
    key as a suggestion; returns those keys. Keys starting with ``_`` (``__config_file__``,
    comments) are left alone."""
    import difflib
    known = known_config_keys()
    unknown = [k for k in conf if isinstance(k, str) and not k.startswith("_")
               and k not in known]
    for k in unknown:
        close = difflib.get_close_matches(k, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        log.warning("%s: unknown key %r ignored%s", where, k, hint)
    return unknown


def load_peer_config(conf: Mapping[str, Any]) -> PeerConfig:
    """Check a config mapping (keys as in conf/config.json, variables already substituted)
    and load the files it names."""
    where = str(conf.get("__config_file__", "config"))
    if not isinstance(conf, Mapping):
        raise ConfigError(f"{where}: the config must be a mapping")
    for k in _REQUIRED:
        v = conf.get(k)
        if v is None or (isinstance(v, (str, os.PathLike)) and not os.fspath(v)):
            raise ConfigError(f"{where}: missing or empty {k!r}")
        if not isinstance(v, (str, os.PathLike)):
            raise ConfigError(f"{where}: {k} must be a string, not {v!r}")
    warn_unknown_keys(conf, where)
    settings = Settings.from_mapping({"cipher_suite": default_suite_name(), **conf}, where)

    password = conf.get("my_prikey_password")
    if password is None:
        password = os.environ.get("P2PSC_PRIKEY_PASSWORD")
    if password is not None and not isinstance(password, str):
        raise ConfigError(f"{where}: my_prikey_password must be a string")
    try:
        password_bytes = password.encode("utf-8") if password else None
    except UnicodeEncodeError:
        raise ConfigError(f"{where}: my_prikey_password is not valid text") from None
    private_key = keys.load_private_key(conf["my_prikey_file"], password_bytes)

    xconfig = Path(conf["xconfig"])
    me = _parse_address(_read_json(xconfig, "own peer record (xconfig)"), str(xconfig))
    peers = PeerStore.load(Path(conf["known_peers_file"]), Path(conf["peer_pubkey_path"]))

    url = conf.get("find_peer_info_url")
    if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
        raise ConfigError(f"{where}: find_peer_info_url must be an http:// or https:// URL")
    relay = conf.get("relay")
    if relay is not None:
        relay = _parse_address(relay, f"{where}: relay")
        if relay.port == 0:
            raise ConfigError(f"{where}: relay: port must be from 1 to 65535")
    return PeerConfig(peer_id=me.peer_id, host=me.host, port=me.port, private_key=private_key,
                      peers=peers, settings=settings, find_peer_info_url=url or None,
                      config_file=where, xconfig_file=str(xconfig), relay=relay)
