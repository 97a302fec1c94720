"""Throwaway certificates for TLS tests: a CA, a server certificate for 127.0.0.1, client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, key, cert):
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(subject, issuer_name, issuer_key, public_key, is_ca=False, san=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> Path:
    """Write ca.pem, server.pem/.key (127.0.0.1), client.pem/.key (signed by the CA) and
    rogue.pem/.key (self-signed, not trusted) into ``directory``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("hl7bridge test CA", _name("hl7bridge test CA"), ca_key, ca_key.public_key(), is_ca=True)
    _write(directory, "ca", ca_key, ca_cert)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        "127.0.0.1", ca_cert.subject, ca_key, server_key.public_key(),
        san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
    )
    _write(directory, "server", server_key, server_cert)
    client_key = ec.generate_private_key(ec.SECP256R1())
    _write(directory, "client", client_key, _issue("sending-ehr", ca_cert.subject, ca_key, client_key.public_key()))
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    _write(directory, "rogue", rogue_key, _issue("rogue", _name("rogue"), rogue_key, rogue_key.public_key()))
    return directory
