"""Enrollment tokens beyond creation: the install command, the list, revocation.

Creation itself is `core.devices.create_enroll_token` (the CLI and the portal
both call it, so the rules and the audit row are the same). The token is shown
once, inside the install command; only its hash is stored.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit
from core.models import Account, EnrollToken, utcnow
from core.tls_identity import certificate_pin
from core.validate import InvalidInput


def install_command(tracker_url: str, token: str, tls_cert: str = "") -> str:
    """The one line an admin pastes on the appliance (as root).

    With the server's own TLS certificate (`http.tls_cert`) the line pins its
    fingerprint, so the device needs neither a CA file nor SSL_CERT_FILE.
    """
    pin = certificate_pin(tls_cert)
    return (
        f"rly-client enroll --tracker {shlex.quote(tracker_url)} --token {shlex.quote(token)}"
        + (f" --tracker-fingerprint {pin}" if pin else "")
        + " && rly-client install-service"
    )


@dataclass(frozen=True)
class TokenRow:
    token: EnrollToken
    account: str
    state: str  # active | expired | used up | revoked


def token_state(token: EnrollToken, now: datetime) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.uses_left < 1:
        return "used up"
    if token.expires_at <= now:
        return "expired"
    return "active"


def list_tokens(session: Session, *, account_id: int | None, limit: int = 200) -> list[TokenRow]:
    """Newest first; `account_id` None lists every account's (superadmin)."""
    query = select(EnrollToken, Account.name).join(Account, Account.id == EnrollToken.account_id)
    if account_id is not None:
        query = query.where(EnrollToken.account_id == account_id)
    now = utcnow()
    rows = session.execute(query.order_by(EnrollToken.id.desc()).limit(limit)).all()
    return [TokenRow(token, name, token_state(token, now)) for token, name in rows]


def revoke_token(
    session: Session, *, token_id: int, account_id: int | None, actor: str, source_ip: str = ""
) -> EnrollToken:
    """No more enrollments with it (the tracker refuses it as revoked); devices stay as they are."""
    token = session.get(EnrollToken, token_id)
    if token is None or (account_id is not None and token.account_id != account_id):
        raise InvalidInput(f"enrollment token {token_id} does not exist")
    if token.revoked_at is not None:
        raise InvalidInput(f"enrollment token {token_id} is already revoked")
    token.revoked_at = utcnow()
    token.uses_left = 0  # a tracker that predates revoked_at refuses it too
    audit.record(
        session,
        action="enroll_token.revoke",
        actor=actor,
        account_id=token.account_id,
        target=f"enroll-token:{token_id}",
        source_ip=source_ip,
    )
    return token
