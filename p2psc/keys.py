"""RSA keys: generating, loading and saving them, and writing files atomically.

The RSA operations themselves (:func:`sign`, :func:`verify`, :func:`encrypt`, :func:`decrypt`:
RSA-PSS with SHA-256, MGF1-SHA-256, salt length = digest length, and RSA-OAEP with SHA-256),
the fingerprint and the peer id rule live in :mod:`p2psc._proto.rsakeys`, which has no file
access, and are re-exported here.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ._proto.rsakeys import (
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    decrypt,
    encrypt,
    fingerprint,
    same_public_key,
    sign,
    validate_peer_id,
    verify,
)
from .p2pexcept import ConfigError

log = logging.getLogger("p2psc.keys")

__all__ = [
    "MIN_RSA_BITS",
    "MAX_RSA_BITS",
    "PUBKEY_SUFFIX",
    "validate_peer_id",
    "generate_private_key",
    "load_private_key",
    "load_public_key",
    "parse_public_key",
    "public_key_pem",
    "private_key_pem",
    "write_private_key",
    "fingerprint",
    "same_public_key",
    "sign",
    "verify",
    "encrypt",
    "decrypt",
    "atomic_write",
]

PUBKEY_SUFFIX = ".pubkey.pem"
#: Largest PEM file accepted for a key (an 8192-bit private key is about 6.5 KB).
MAX_KEY_FILE_SIZE = 64 * 1024


PathLike = Union[str, "os.PathLike[str]"]


def _check_rsa_private(key: object, where: str) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{where}: not an RSA private key")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise ConfigError(f"{where}: RSA key of {key.key_size} bits; use {MIN_RSA_BITS} to {MAX_RSA_BITS}")
    return key


def _check_rsa_public(key: object, where: str) -> rsa.RSAPublicKey:
    if not isinstance(key, rsa.RSAPublicKey):
        raise ConfigError(f"{where}: not an RSA public key")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise ConfigError(f"{where}: RSA key of {key.key_size} bits; use {MIN_RSA_BITS} to {MAX_RSA_BITS}")
    return key


def _read_key_file(path: PathLike, what: str) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_KEY_FILE_SIZE:
            raise ConfigError(f"{p}: {what} file is {size} bytes, larger than any key")
        return p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: {what} file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read {what} file: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte or an unencodable character in the path
        raise ConfigError(f"{path!r}: cannot read {what} file: invalid file name") from None


def generate_private_key(bits: int = 3072) -> rsa.RSAPrivateKey:
    """Generate a new RSA private key (public exponent 65537)."""
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ConfigError(f"RSA key size {bits}: use {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def load_private_key(path: PathLike, password: bytes | None = None) -> rsa.RSAPrivateKey:
    """Load an RSA private key from a PEM file (PKCS#1 or PKCS#8, optionally encrypted).

    Warns, as ssh does, when the file is readable by group or others.
    """
    data = _read_key_file(path, "private key")
    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("private key file %s is accessible by group or others (mode %o); "
                        "run: chmod 600 %s", path, stat.S_IMODE(mode), path)
    except OSError:
        pass
    try:
        key = serialization.load_pem_private_key(data, password=password or None)
    except TypeError as exc:
        # "Password was not given but private key is encrypted" / "... not encrypted"
        if password:
            raise ConfigError(f"{path}: a password was given but the private key is not "
                              "encrypted") from None
        raise ConfigError(f"{path}: the private key is encrypted; set my_prikey_password in the "
                          "config or the P2PSC_PRIKEY_PASSWORD environment variable") from exc
    except ValueError:
        if password:
            raise ConfigError(f"{path}: cannot decrypt the private key (wrong password?) "
                              "or it is not a PEM private key") from None
        raise ConfigError(f"{path}: not a PEM private key") from None
    except Exception as exc:  # noqa: BLE001 - cryptography raises other types for odd formats
        raise ConfigError(f"{path}: cannot load private key: {type(exc).__name__}") from None
    return _check_rsa_private(key, str(path))


def parse_public_key(pem: bytes, where: str = "public key") -> rsa.RSAPublicKey:
    """Parse a PEM public key (SubjectPublicKeyInfo or PKCS#1 ``RSA PUBLIC KEY``)."""
    if len(pem) > MAX_KEY_FILE_SIZE:
        raise ConfigError(f"{where}: too large for a public key")
    try:
        key = serialization.load_pem_public_key(pem)
    except Exception:  # noqa: BLE001 - any parse failure is "not a public key"
        raise ConfigError(f"{where}: not a PEM public key") from None
    return _check_rsa_public(key, where)


def load_public_key(path: PathLike) -> rsa.RSAPublicKey:
    """Load an RSA public key from a PEM file."""
    return parse_public_key(_read_key_file(path, "public key"), str(path))


def public_key_pem(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) encoding of a public key, or of a private key's public half."""
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def private_key_pem(key: rsa.RSAPrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM of a private key, encrypted with ``passphrase`` when one is given."""
    enc: serialization.KeySerializationEncryption
    enc = (serialization.BestAvailableEncryption(passphrase) if passphrase
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def write_private_key(path: PathLike, key: rsa.RSAPrivateKey, passphrase: bytes | None = None,
                      *, overwrite: bool = False) -> None:
    """Write a private key with mode 0600; refuses to replace an existing file unless asked."""
    data = private_key_pem(key, passphrase)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path}: a private key already exists; not overwriting it") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def atomic_write(path: PathLike, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same folder, then rename."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=str(p.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
