"""The TLS trust of a device: a pinned CA file, a pinned fingerprint, or the system store.

A pin is checked right after the handshake by an `ssl.SSLObject` subclass
(`SSLContext.sslobject_class`), so the one check covers httpx (tracker
check-ins, through anyio) and asyncio (WebSocket tunnels) alike. A mismatch
fails the handshake with one line naming the presented and the pinned
fingerprint.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from core.tls_identity import fingerprint, normalize_fingerprint, pem_certificates

Check = Callable[[bytes, str | None], None]


class PinMismatch(ssl.SSLCertVerificationError):
    """The peer's certificate is not the pinned identity."""


@dataclass(frozen=True)
class TlsTrust:
    """What the device trusts for HTTPS and WSS: at most one of the two pins."""

    ca_file: Path | None = None
    fingerprint: str = ""

    def describe(self) -> str:
        if self.fingerprint:
            return f"pinned {self.fingerprint}"
        if self.ca_file is not None:
            return f"pinned CA {self.ca_file}"
        return "system CA store"


class _PinnedSSLObject(ssl.SSLObject):
    """Runs the pin check once the handshake is done (before any byte is sent)."""

    rly_check: Check | None = None

    def do_handshake(self) -> None:
        super().do_handshake()
        check = type(self).rly_check
        if check is not None:
            check(self.getpeercert(binary_form=True) or b"", self.server_hostname)


def _fingerprint_check(pinned: str) -> Check:
    def check(der: bytes, host: str | None) -> None:
        presented = fingerprint(der)
        if presented != pinned:
            raise PinMismatch(
                f"TLS certificate of {host or 'the server'} refused: presented {presented}, "
                f"pinned {pinned}"
            )

    return check


def _subject(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def _ca_check(ca_file: Path) -> Check:
    pem = ca_file.read_text(encoding="ascii")
    certs = [x509.load_der_x509_certificate(der) for der in pem_certificates(pem)]
    if not certs:
        raise ValueError(f"{ca_file}: no PEM certificate found")
    pinned = ", ".join(fingerprint(c.public_bytes(Encoding.DER)) for c in certs)
    store = Store(certs)

    def check(der: bytes, host: str | None) -> None:
        presented = fingerprint(der)
        if any(presented == fingerprint(c.public_bytes(Encoding.DER)) for c in certs):
            return  # the pinned file is the server's own (self-signed) certificate
        try:
            leaf = x509.load_der_x509_certificate(der)
            verifier = (
                PolicyBuilder()
                .store(store)
                .time(datetime.datetime.now(datetime.UTC))
                .build_server_verifier(_subject(host or ""))
            )
            verifier.verify(leaf, [])
        except (VerificationError, ValueError) as exc:
            why = str(exc).splitlines()[0][:80] if str(exc) else "not issued by it"
            raise PinMismatch(
                f"TLS certificate of {host or 'the server'} refused: presented {presented}, "
                f"pinned CA {pinned} ({why})"
            ) from None

    return check


def client_context(trust: TlsTrust) -> ssl.SSLContext:
    """An SSLContext for connecting to the tracker or a relay's WebSocket endpoint."""
    if not trust.fingerprint and trust.ca_file is None:
        return ssl.create_default_context()
    check = (
        _fingerprint_check(normalize_fingerprint(trust.fingerprint))
        if trust.fingerprint
        else _ca_check(trust.ca_file)  # type: ignore[arg-type]
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # The pin replaces OpenSSL's chain and name checks; `check` does them (or compares
    # the exact certificate) before the handshake counts as done.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.sslobject_class = type(
        "PinnedSSLObject", (_PinnedSSLObject,), {"rly_check": staticmethod(check)}
    )
    return context
