"""First-login TOTP enrolment: password, then QR + secret, then a code confirms it."""

from __future__ import annotations

from urllib.parse import quote

from sqlalchemy import select

from core.models import AuditEvent, User
from tests.portal.support import CSRF_RE, PortalEnv


def test_first_login_enrols_totp_and_returns_to_next(env: PortalEnv) -> None:
    """An unenrolled user gets a QR code and secret, and a valid code finishes the login."""
    alice = env.add_user("alice", confirmed=False)
    client = env.client()
    response = client.login("alice", alice.password, "", next_path="/approve/tok")
    assert response.status_code == 303
    assert response.headers["location"] == f"/enrol?next={quote('/approve/tok', safe='')}"
    partial_cookie = client.http.cookies.get("rly_session")
    page = client.http.get(response.headers["location"])
    assert page.status_code == 200
    assert "<svg" in page.text
    assert alice.secret in page.text
    csrf = CSRF_RE.search(page.text)
    assert csrf
    form = {"csrf": csrf.group(1), "next": "/approve/tok"}
    wrong = f"{(int(alice.code()) + 1) % 1_000_000:06d}"
    assert client.http.post("/enrol", data={**form, "code": wrong}).status_code == 400
    done = client.http.post("/enrol", data={**form, "code": alice.code()})
    assert done.status_code == 303
    assert done.headers["location"] == "/approve/tok"
    assert client.http.cookies.get("rly_session") != partial_cookie
    assert client.http.get("/devices").status_code == 200
    with env.sessions() as s:
        assert s.scalar(select(User.totp_confirmed).where(User.id == alice.id)) is True
        assert s.scalar(select(AuditEvent.id).where(AuditEvent.action == "portal.totp_enrolled"))


def test_password_only_session_cannot_approve(env: PortalEnv) -> None:
    """Before the TOTP is confirmed the session opens no page and cannot decide anything."""
    alice = env.add_user("alice", confirmed=False)
    approval_id, token = env.create_approval()
    client = env.client()
    client.login("alice", alice.password, "")
    assert client.http.get(f"/approve/{token}").status_code == 303
    enrol_csrf = CSRF_RE.search(client.http.get("/enrol").text)
    assert enrol_csrf
    data = {"decision": "approve", "csrf": enrol_csrf.group(1)}
    assert client.http.post(f"/approve/{token}", data=data).status_code == 403
    assert env.approval(approval_id).status == "pending"


def test_enrolment_code_is_single_use(env: PortalEnv) -> None:
    """The code that confirmed enrolment cannot log in again."""
    alice = env.add_user("alice", confirmed=False)
    client = env.client()
    client.login("alice", alice.password, "")
    csrf = CSRF_RE.search(client.http.get("/enrol").text)
    assert csrf
    code = alice.code()
    client.http.post("/enrol", data={"csrf": csrf.group(1), "code": code})
    assert env.client().login("alice", alice.password, code).status_code == 401


def test_enrolment_without_csrf_is_refused(env: PortalEnv) -> None:
    """POST /enrol without the CSRF token is 403 and the TOTP stays unconfirmed."""
    alice = env.add_user("alice", confirmed=False)
    client = env.client()
    client.login("alice", alice.password, "")
    assert client.http.post("/enrol", data={"code": alice.code()}).status_code == 403
    with env.sessions() as s:
        assert s.scalar(select(User.totp_confirmed).where(User.id == alice.id)) is False
