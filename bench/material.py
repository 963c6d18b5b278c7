"""Key material generated at the start of a run: TLS certificates and p2psc peer folders."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .common import HOST

TLS_SERVER_NAME = "localhost"
SERVER_PEER_ID = "bench-server"
CLIENT_PEER_ID = "bench-client"


def _rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _pem_private(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls_material(directory: Path, bits: int) -> dict[str, str]:
    """Self-signed RSA CA plus server and client certificates (RSA ``bits``); return file paths."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    ca_key = _rsa_key(bits)
    ca_name = _name("p2psc bench CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": str(directory / "ca.pem")}
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                        ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = _rsa_key(bits)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{TLS_SERVER_NAME}" if role == "server" else "bench-client"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if role == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(TLS_SERVER_NAME), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        (directory / f"{role}.key.pem").write_bytes(_pem_private(key))
        (directory / f"{role}.cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"] = str(directory / f"{role}.key.pem")
        files[f"{role}_cert"] = str(directory / f"{role}.cert.pem")
    return files


def tls_server_context(files: dict[str, str]) -> ssl.SSLContext:
    """TLS 1.3 only, client certificate required, no session tickets."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files["server_cert"], files["server_key"])
    ctx.load_verify_locations(files["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0
    return ctx


def tls_client_context(files: dict[str, str]) -> ssl.SSLContext:
    """TLS 1.3 only, server verified with check_hostname, client certificate presented."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(files["ca"])
    ctx.load_cert_chain(files["client_cert"], files["client_key"])
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_p2psc_material(directory: Path, bits: int) -> dict[str, str]:
    """Server and client RSA keys of ``bits`` bits, as PEM files; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {"dir": str(directory)}
    for peer_id in (SERVER_PEER_ID, CLIENT_PEER_ID):
        key = _rsa_key(bits)
        private = directory / f"{peer_id}.key.pem"
        private.write_bytes(_pem_private(key))
        private.chmod(0o600)
        (directory / f"{peer_id}.pub.pem").write_bytes(_pem_public(key))
        files[f"{peer_id}:private"] = str(private)
        files[f"{peer_id}:public"] = str(directory / f"{peer_id}.pub.pem")
    return files


def p2psc_config(
    files: dict[str, str],
    workdir: Path,
    me: str,
    peer: str,
    peer_port: int,
    my_port: int = 0,
    cipher_suite: str | None = None,
) -> dict[str, Any]:
    """Write the xconfig / known-peers / pubkey files for ``me`` and return the config mapping."""
    workdir.mkdir(parents=True, exist_ok=True)
    pubkeys = workdir / "pubkeys"
    pubkeys.mkdir(exist_ok=True)
    (pubkeys / f"{peer}.pubkey.pem").write_bytes(Path(files[f"{peer}:public"]).read_bytes())
    xconfig = workdir / "xconfig.json"
    xconfig.write_text(json.dumps({"peer_id": me, "host": HOST, "port": my_port}))
    known = workdir / "peers.json"
    known.write_text(json.dumps({peer: {"peer_id": peer, "host": HOST, "port": peer_port}}))
    config: dict[str, Any] = {
        "my_prikey_file": files[f"{me}:private"],
        "xconfig": str(xconfig),
        "known_peers_file": str(known),
        "peer_pubkey_path": str(pubkeys),
        # one client peer opens up to 1,000 connections at once (memory test): above the
        # default per-peer cap, which would close all but the newest 64
        "max_connections_per_peer": 0,
    }
    if cipher_suite:
        config["cipher_suite"] = cipher_suite
    return config
