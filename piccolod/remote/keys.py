"""
Key material of the remote subsystem, made with ``cryptography`` alone:
the tunnels' ed25519 device key (OpenSSH formats), the ACME account key
and certificate keys, SSH host key fingerprints in OpenSSH's form, and the
reading and checking of issued certificate chains.

Tests: ``tests/unit/test_remote_keys.py``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from piccolod.errors import InvalidCommand

__all__ = [
    "ChainInfo",
    "device_public_key",
    "generate_account_key",
    "generate_device_key",
    "generate_domain_key",
    "openssh_fingerprint",
    "public_key_fingerprint",
    "read_chain",
]


def generate_device_key() -> str:
    """A new ed25519 private key in the OpenSSH private key format (unencrypted)."""
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")


def _load_openssh_private(text: str) -> Any:
    try:
        return serialization.load_ssh_private_key(text.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise InvalidCommand(f"not an OpenSSH private key: {e}") from None


def device_public_key(private_key: str, comment: str = "piccolod") -> str:
    """``ssh-ed25519 AAAA... <comment>``: the line for ``authorized_keys``."""
    key = _load_openssh_private(private_key)
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{line.decode('ascii')} {comment}".rstrip()


def openssh_fingerprint(key_blob: bytes) -> str:
    """OpenSSH's ``SHA256:<base64 without padding>`` of an SSH wire-format public key."""
    digest = hashlib.sha256(key_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def public_key_fingerprint(public_line: str) -> str:
    """The fingerprint of an ``authorized_keys``-style line (``ssh-ed25519 AAAA...``)."""
    parts = public_line.split()
    if len(parts) < 2:
        raise InvalidCommand("not an OpenSSH public key line")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise InvalidCommand("not an OpenSSH public key line") from None
    return openssh_fingerprint(blob)


def generate_account_key() -> str:
    """A new RSA-2048 ACME account key (PKCS#8 PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def generate_domain_key() -> str:
    """A new ECDSA P-256 certificate key (PKCS#8 PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


class ChainInfo:
    """What :func:`read_chain` found in a checked chain."""

    def __init__(
        self, not_before: float, not_after: float, serial: str, issuer: str, names: list[str]
    ) -> None:
        self.not_before = not_before
        self.not_after = not_after
        self.serial = serial
        self.issuer = issuer
        self.names = names


def read_chain(chain_pem: str, key_pem: str, hostname: str) -> ChainInfo:
    """
    Read a PEM chain (leaf first) and check it belongs to ``key_pem`` and
    names ``hostname``; raises ``InvalidCommand`` when it does not (a
    chain that fails here is never stored).
    """
    try:
        certs = x509.load_pem_x509_certificates(chain_pem.encode("ascii"))
        key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError) as e:
        raise InvalidCommand(f"unreadable certificate or key: {e}") from None
    if not certs:
        raise InvalidCommand("the chain holds no certificate")
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if leaf.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        raise InvalidCommand("the certificate is not for this key")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [n.lower() for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if hostname not in names:
        raise InvalidCommand(f"the certificate does not name {hostname!r} (names: {names})")
    for child, parent in itertools.pairwise(certs):
        if child.issuer != parent.subject:
            raise InvalidCommand("the chain is out of order")
    return ChainInfo(
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        serial=format(leaf.serial_number, "x"),
        issuer=leaf.issuer.rfc4514_string(),
        names=names,
    )
