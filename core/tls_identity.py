"""TLS certificate fingerprints as devices pin them: `SHA256:<base64, no padding>`.

Stdlib only: `rly serve` prints the fingerprint of its certificate and
`rly-client` compares the one it is shown, so both use this one format.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
from pathlib import Path

PREFIX = "SHA256:"


def fingerprint(der: bytes) -> str:
    """The SHA-256 fingerprint of a DER certificate, OpenSSH style."""
    digest = hashlib.sha256(der).digest()
    return PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def pem_certificates(pem: str) -> list[bytes]:
    """The DER bytes of every certificate in a PEM text (in order)."""
    found = []
    marker = "-----END CERTIFICATE-----"
    for block in pem.split(marker)[:-1]:
        start = block.find("-----BEGIN CERTIFICATE-----")
        if start >= 0:
            found.append(ssl.PEM_cert_to_DER_cert(block[start:] + marker + "\n"))
    return found


def file_fingerprint(path: Path) -> str:
    """The fingerprint of the first certificate in a PEM file (a server's own certificate)."""
    certs = pem_certificates(path.read_text(encoding="ascii"))
    if not certs:
        raise ValueError(f"{path}: no PEM certificate found")
    return fingerprint(certs[0])


def normalize_fingerprint(text: str) -> str:
    """`SHA256:<base64>` or 64 hex digits (colons allowed) -> `SHA256:<base64>`; else ValueError."""
    value = text.strip()
    if value.upper().startswith(PREFIX):
        raw = value[len(PREFIX) :]
        try:
            digest = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            digest = b""
    else:
        try:
            digest = bytes.fromhex(value.replace(":", ""))
        except ValueError:
            digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("a TLS fingerprint must be SHA256:<base64> or 64 hex digits")
    return PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def certificate_pin(tls_cert: str) -> str:
    """The fingerprint devices pin for the server's `http.tls_cert`, or "" (no TLS, unreadable)."""
    if not tls_cert:
        return ""
    try:
        return file_fingerprint(Path(tls_cert))
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
