"""A throwaway certificate authority for the local cluster and tests (``cryptography``).

:func:`make_tls` writes a CA certificate and one server certificate signed by it (for
loopback and any other addresses or names asked for) into a directory; the daemons
serve HTTPS with the server pair (``tls_cert_file``, ``tls_key_file``) and their clients
verify against the CA (``ca_file``). The keys :func:`make_tls` writes live in a temporary
directory for one run. :func:`mint_tls` makes the same pair in memory with a chosen
validity: ``p2pimage keys tls`` writes it for the kustomize base's TLS Secret (a CA that
signs one certificate and whose key is thrown away).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CaFiles", "TlsBundle", "TlsPems", "make_ca", "make_tls", "mint_tls"]

# A day: long enough for any test or demo, short enough that a leaked file is soon useless.
_VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class TlsBundle:
    ca_file: Path
    cert_file: Path
    key_file: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class TlsPems:
    """A CA certificate and one server certificate it signed, with the server's key (PEM).
    The CA's own key is not kept: the CA signs this one certificate and nothing else."""

    ca: bytes
    cert: bytes
    key: bytes


def make_tls(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsBundle:
    """Write ``ca.pem``, ``server.pem`` and ``server-key.pem`` (mode 0600) into
    ``directory``; the server certificate names every entry of ``hosts`` (IP addresses
    as IP SANs, the rest as DNS names)."""
    directory.mkdir(parents=True, exist_ok=True)
    pems = mint_tls(hosts)
    bundle = TlsBundle(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    bundle.ca_file.write_bytes(pems.ca)
    bundle.cert_file.write_bytes(pems.cert)
    bundle.key_file.write_bytes(pems.key)
    bundle.key_file.chmod(0o600)
    return bundle


def _new_ca(
    name: str, now: datetime.datetime, validity: datetime.timedelta
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA (EC P-256), valid from five minutes ago for ``validity``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ca, ca_key


@dataclass(frozen=True)
class CaFiles:
    cert_file: Path
    key_file: Path


def make_ca(directory: Path, name: str = "p2pimage throwaway CA") -> CaFiles:
    """Write a CA certificate and its key (``ca.pem``, ``ca-key.pem``, mode 0600) into
    ``directory``: a CA that signs certificates itself (the forward proxy's interception
    CA in tests)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, key = _new_ca(name, datetime.datetime.now(datetime.UTC), _VALIDITY)
    files = CaFiles(directory / "ca.pem", directory / "ca-key.pem")
    files.cert_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(_pem_key(key))
    files.key_file.chmod(0o600)
    return files


def mint_tls(
    hosts: tuple[str, ...],
    validity: datetime.timedelta = _VALIDITY,
    ca_common_name: str = "p2pimage throwaway CA",
) -> TlsPems:
    """A fresh CA and a server certificate for ``hosts`` (IP addresses as IP SANs, the
    rest as DNS names; the first is the subject's common name), both valid from five
    minutes ago for ``validity``."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host name or address")
    now = datetime.datetime.now(datetime.UTC)
    ca, ca_key = _new_ca(ca_common_name, now, validity)
    ca_name = ca.subject
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return TlsPems(
        ca.public_bytes(serialization.Encoding.PEM),
        cert.public_bytes(serialization.Encoding.PEM),
        _pem_key(key),
    )
