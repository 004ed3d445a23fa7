"""A throwaway certificate authority for TLS tests: a CA, a server certificate for 127.0.0.1 and client
certificates, written as PEM files (EC P-256 keys: fast to make, read by Mosquitto's OpenSSL and Python's)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "make_pki", "mosquitto_tls_config"]


@dataclass(frozen=True)
class Pki:
    """PEM files: the CA, the broker's certificate and key, and one client's certificate and key."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


_CA_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
)  # fmt: skip


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, common_name: str, usage: x509.ObjectIdentifier, san: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if san:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(folder: Path, client: str = "fleet") -> Pki:
    """A new CA in ``folder`` and the certificates it signs (client CN ``client``)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("edgeship test CA"))
        .issuer_name(_name("edgeship test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    server, server_key = _issue(ca_key, ca.subject, "127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, san=True)
    (folder / "server.crt").write_bytes(server.public_bytes(pem))
    peer, peer_key = _issue(ca_key, ca.subject, client, ExtendedKeyUsageOID.CLIENT_AUTH, san=False)
    (folder / "client.crt").write_bytes(peer.public_bytes(pem))
    return Pki(
        folder / "ca.crt", folder / "server.crt", _write_key(server_key, folder / "server.key"),
        folder / "client.crt", _write_key(peer_key, folder / "client.key"),
    )  # fmt: skip


def mosquitto_tls_config(port: int, pki: Pki, data: Path, *, require_certificate: bool = True) -> str:
    """A Mosquitto listener on 127.0.0.1:``port`` with TLS only, verifying clients against the CA."""
    return "\n".join(
        [
            f"listener {port} 127.0.0.1",
            f"cafile {pki.ca}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            "tls_version tlsv1.2",
            f"require_certificate {'true' if require_certificate else 'false'}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {data}/",
        ]
    )
