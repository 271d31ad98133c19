"""Throw-away TLS certificates and SuperNode keys for one ``mmfl flower-local`` run.

Generated in-process with the ``cryptography`` package (a dependency of flwr), so no ``openssl``
or ``ssh-keygen`` binary is needed:

- :func:`make_tls_files`: a self-signed CA and a server certificate signed by it whose subject
  alternative names cover the loopback addresses (``IP:127.0.0.1``, ``IP:::1``, ``DNS:localhost``)
  and any extra hosts. The SuperLink serves with the server certificate; SuperNodes, the
  ``flwr`` CLI and the SuperLink's own SuperExec verify it against the CA (FLOWER-NOTES s. 5).
- :func:`make_node_key`: an ECDSA (NIST P-384) key pair in OpenSSH format, the format
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read
  (FLOWER-NOTES s. 6).

Every file is created with mode 0600 and every folder with 0700 (nothing of a deployment is
readable by other users; the CA certificate is not secret, but with it and the address any
local process could talk to the SuperLink). :func:`public_key_digest` names a node's key the
way the ServerApp sees it (Flower's ``NodeInfo.public_key``), to bind a client to its key.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files of one run: CA certificate, server certificate and server key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a file created with mode 0600 (never readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def public_key_digest(key: bytes | str | Path) -> str:
    """Hex SHA-256 of a public key's DER SubjectPublicKeyInfo. ``key``: PEM bytes (what
    Flower's ``NodeInfo.public_key`` holds) or the path of an OpenSSH ``.pub`` file; the same
    key gives the same digest either way. Raises ValueError for anything else."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    if isinstance(key, bytes):
        pub = serialization.load_pem_public_key(key)
    else:
        pub = serialization.load_ssh_public_key(Path(key).read_bytes())
    der = pub.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _san(hosts) -> list:
    from cryptography import x509

    names: list = []
    for h in dict.fromkeys(hosts):  # keep order, drop duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def make_tls_files(folder: str | Path, hosts: tuple[str, ...] = (), *,
                   days: int = 30) -> TlsFiles:
    """Write ``ca.crt``, ``server.pem`` and ``server.key`` into ``folder``.

    Args:
        folder: created if missing.
        hosts: extra IP addresses or DNS names for the server certificate's SAN, besides
            :data:`LOOPBACK_HOSTS` (e.g. the SuperLink machine's address for a multi-machine run).
        days: validity.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mmfl flower-local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(_san((*LOOPBACK_HOSTS, *hosts))),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    _write_private(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    return files


def make_node_key(path: str | Path) -> tuple[Path, Path]:
    """Write an ECDSA P-384 key pair in OpenSSH format: ``path`` (private) and ``path.pub``,
    both 0600; returns both paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    _write_private(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH)
                   + f" mmfl-{path.stem}\n".encode())
    return path, pub
