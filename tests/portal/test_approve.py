"""The approval page: show, approve, reject, and refuse anything else without side effects."""

from __future__ import annotations

import secrets
import time
from typing import Any

from core import approvals
from core.models import Approval, AuditEvent, PortalSession
from tests.portal.support import Client, PortalEnv


def _logged_in(env: PortalEnv, username: str = "alice") -> tuple[Client, int]:
    user = env.add_user(username)
    client = env.client()
    client.login_user(user)
    return client, user.id


def _snapshot(env: PortalEnv, approval_id: int) -> tuple[Any, ...]:
    row = env.approval(approval_id)
    return (row.status, row.decided_at, row.decided_by, row.account_id, env.count(AuditEvent))


def test_get_shows_the_request_and_changes_nothing(env: PortalEnv) -> None:
    """GET /approve/{token} shows code, client, version, login, relay and time, changing nothing."""
    client, _ = _logged_in(env)
    approval_id, token = env.create_approval()
    before = _snapshot(env, approval_id)
    page = client.http.get(f"/approve/{token}")
    assert page.status_code == 200
    row = env.approval(approval_id)
    for text in (row.code, "198.51.100.7", "SSH-2.0-OpenSSH_9.2p1", "partner", "relay-1"):
        assert text in page.text
    assert row.created_at.strftime("%Y-%m-%d %H:%M") in page.text
    assert 'value="approve"' in page.text
    assert 'value="reject"' in page.text
    assert page.headers["cache-control"] == "no-store"
    assert _snapshot(env, approval_id) == before
    assert env.hub.topics == []


def test_security_headers_on_pages(env: PortalEnv) -> None:
    """Pages carry CSP default-src 'self', X-Frame-Options DENY, no-store and no referrer."""
    headers = env.client().http.get("/login").headers
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"


def test_approve_sets_status_account_and_wakes_the_relay(env: PortalEnv) -> None:
    """Approve marks the row approved by this user's account and notifies the hub at once."""
    client, user_id = _logged_in(env)
    approval_id, token = env.create_approval()
    response = client.post(f"/approve/{token}", {"decision": "approve"})
    assert response.status_code == 200
    assert "Approved" in response.text
    row = env.approval(approval_id)
    assert row.status == "approved"
    assert row.decided_by == user_id
    assert row.account_id is not None
    assert env.hub.topics == [f"approval:{approval_id}"]


def test_reject_sets_status_rejected(env: PortalEnv) -> None:
    """Reject marks the row rejected and notifies the hub."""
    client, _ = _logged_in(env)
    approval_id, token = env.create_approval()
    response = client.post(f"/approve/{token}", {"decision": "reject"})
    assert "Rejected" in response.text
    assert env.approval(approval_id).status == "rejected"
    assert env.hub.topics == [f"approval:{approval_id}"]


def test_used_token_is_gone(env: PortalEnv) -> None:
    """A decided token shows 410 on GET and POST and cannot be flipped."""
    client, _ = _logged_in(env)
    approval_id, token = env.create_approval()
    client.post(f"/approve/{token}", {"decision": "approve"})
    before = _snapshot(env, approval_id)
    assert client.http.get(f"/approve/{token}").status_code == 410
    again = client.post(f"/approve/{token}", {"decision": "reject"})
    assert again.status_code == 410
    assert "already approved" in again.text
    assert _snapshot(env, approval_id) == before


def test_expired_token_is_gone(env: PortalEnv) -> None:
    """An expired token shows 410 and a POST leaves the row untouched."""
    client, _ = _logged_in(env)
    approval_id, token = env.create_approval(ttl=-1)
    before = _snapshot(env, approval_id)
    assert client.http.get(f"/approve/{token}").status_code == 410
    response = client.post(f"/approve/{token}", {"decision": "approve"})
    assert response.status_code == 410
    assert "expired" in response.text
    assert _snapshot(env, approval_id) == before


def test_abandoned_request_says_it_is_gone(env: PortalEnv) -> None:
    """If the SSH client left, the page says the request is gone (410)."""
    client, _ = _logged_in(env)
    approval_id, token = env.create_approval()
    with env.sessions() as s, s.begin():
        approvals.close_pending(s, approval_id=approval_id, status="abandoned", actor="relay")
    page = client.http.get(f"/approve/{token}")
    assert page.status_code == 410
    assert "disconnected" in page.text


def test_unknown_token_is_404(env: PortalEnv) -> None:
    """An unknown token shows a clear 404 page on GET and POST."""
    client, _ = _logged_in(env)
    page = client.http.get("/approve/not-a-real-token")
    assert page.status_code == 404
    assert "not valid" in page.text
    assert client.post("/approve/nope", {"decision": "approve"}).status_code == 404


def test_post_without_csrf_is_403_and_changes_nothing(env: PortalEnv) -> None:
    """Approving without (or with a wrong) CSRF token is 403 and the request stays pending."""
    client, _ = _logged_in(env)
    approval_id, token = env.create_approval()
    before = _snapshot(env, approval_id)
    assert client.post(f"/approve/{token}", {"decision": "approve"}, csrf=False).status_code == 403
    bad = {"decision": "approve", "csrf": "x" * 43}
    assert client.http.post(f"/approve/{token}", data=bad).status_code == 403
    assert _snapshot(env, approval_id) == before
    assert env.hub.topics == []


def test_anonymous_post_is_403(env: PortalEnv) -> None:
    """A POST without a session is refused and changes nothing."""
    approval_id, token = env.create_approval()
    response = env.client().http.post(f"/approve/{token}", data={"decision": "approve"})
    assert response.status_code == 403
    assert env.approval(approval_id).status == "pending"


def test_bad_decision_value_changes_nothing(env: PortalEnv) -> None:
    """A decision other than approve/reject is 400 and the request stays pending."""
    client, _ = _logged_in(env)
    approval_id, token = env.create_approval()
    assert client.post(f"/approve/{token}", {"decision": "maybe"}).status_code == 400
    assert env.approval(approval_id).status == "pending"


def test_key_bound_request_is_only_for_its_owner(env: PortalEnv) -> None:
    """A request bound to another user's SSH key is 403 for everyone else."""
    client, _ = _logged_in(env)
    bob = env.add_user("bob")
    approval_id, token = env.create_approval(ssh_login="bob", required_user_id=bob.id)
    assert client.http.get(f"/approve/{token}").status_code == 403
    assert client.post(f"/approve/{token}", {"decision": "approve"}).status_code == 403
    assert env.approval(approval_id).status == "pending"


def test_page_escapes_what_the_ssh_client_sent(env: PortalEnv) -> None:
    """A hostile SSH client version is shown escaped, never as markup."""
    client, _ = _logged_in(env)
    _, token = env.create_approval(client_version="SSH-2.0-<script>alert(1)</script>")
    page = client.http.get(f"/approve/{token}").text
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_bogus_tokens_are_404_quickly_and_create_nothing(env: PortalEnv) -> None:
    """1,000 random tokens each get 404 quickly and no row is created anywhere."""
    client, _ = _logged_in(env)
    env.create_approval()
    counts = [env.count(m) for m in (Approval, AuditEvent, PortalSession)]
    start = time.monotonic()
    for _ in range(1000):
        assert client.http.get(f"/approve/{secrets.token_urlsafe(24)}").status_code == 404
    assert time.monotonic() - start < 60
    assert [env.count(m) for m in (Approval, AuditEvent, PortalSession)] == counts
