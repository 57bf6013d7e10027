"""Login: password + TOTP, replay protection, rate limits, sessions and redirects."""

from __future__ import annotations

import statistics
import threading
import time

from sqlalchemy import select

from core.models import AuditEvent, PortalSession
from tests.portal.conftest import MakeEnv
from tests.portal.support import PortalEnv


def test_login_ok_sets_a_hardened_session_cookie(env: PortalEnv) -> None:
    """Right password and code log in with an HttpOnly, SameSite=Strict session cookie."""
    alice = env.add_user("alice")
    client = env.client()
    response = client.login("alice", alice.password, alice.code())
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    cookie = next(
        h for h in response.headers.get_list("set-cookie") if h.startswith("rly_session=")
    )
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Secure" not in cookie
    assert "alice" in client.http.get("/").text
    assert env.count(PortalSession) == 1


def test_https_public_url_makes_cookies_secure(make_env: MakeEnv) -> None:
    """With an https public URL the session cookie is Secure and __Host- prefixed."""
    env = make_env(public_url="https://portal.example")
    alice = env.add_user("alice")
    client = env.client(base_url="https://testserver")
    response = client.login("alice", alice.password, alice.code())
    cookie = next(h for h in response.headers.get_list("set-cookie") if "rly_session=" in h)
    assert cookie.startswith("__Host-rly_session=")
    assert "Secure" in cookie
    assert "strict-transport-security" in client.http.get("/").headers


def test_wrong_password_is_refused(env: PortalEnv) -> None:
    """A wrong password with a right code gets 401 and no session."""
    alice = env.add_user("alice")
    response = env.client().login("alice", "wrong password!", alice.code())
    assert response.status_code == 401
    assert "not right" in response.text
    assert env.count(PortalSession) == 0


def test_wrong_totp_is_refused(env: PortalEnv) -> None:
    """A right password with a wrong code gets 401 and no session."""
    alice = env.add_user("alice")
    wrong = f"{(int(alice.code()) + 1) % 1_000_000:06d}"
    response = env.client().login("alice", alice.password, wrong)
    assert response.status_code == 401
    assert env.count(PortalSession) == 0


def test_totp_code_cannot_be_replayed(env: PortalEnv) -> None:
    """The same code works once; a second login with it is refused."""
    alice = env.add_user("alice")
    code = alice.code()
    assert env.client().login("alice", alice.password, code).status_code == 303
    assert env.client().login("alice", alice.password, code).status_code == 401


def test_parallel_logins_with_one_code_let_exactly_one_in(make_env: MakeEnv) -> None:
    """Twenty simultaneous logins with one code: exactly one session is created."""
    env = make_env(login_attempts_per_user=0, login_attempts_per_source=0)
    alice = env.add_user("alice")
    code = alice.code()
    clients = [env.client() for _ in range(20)]
    forms = [c.login_csrf() for c in clients]
    barrier = threading.Barrier(len(clients))
    results: list[int] = []

    def attempt(index: int) -> None:
        data = {"username": "alice", "password": alice.password, "code": code}
        barrier.wait()
        response = clients[index].http.post("/login", data={**data, "csrf": forms[index]})
        results.append(response.status_code)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [303] + [401] * 19
    assert env.count(PortalSession) == 1


def test_previous_step_code_is_accepted(env: PortalEnv) -> None:
    """A code from the previous 30 s step still works (clock drift)."""
    alice = env.add_user("alice")
    assert env.client().login("alice", alice.password, alice.code(-1)).status_code == 303


def test_code_three_steps_old_is_refused(env: PortalEnv) -> None:
    """A code from three steps (90 s) ago is refused."""
    alice = env.add_user("alice")
    assert env.client().login("alice", alice.password, alice.code(-3)).status_code == 401


def test_per_user_rate_limit_blocks_even_right_credentials(make_env: MakeEnv) -> None:
    """After the per-user failure limit, even the right code is refused until the window passes."""
    env = make_env(login_attempts_per_user=3, login_window=60.0)
    alice = env.add_user("alice")
    for source in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert env.client(source).login("alice", "bad password", "").status_code == 401
    blocked = env.client("10.0.0.4").login("alice", alice.password, alice.code())
    assert blocked.status_code == 429
    assert "Too many failed logins" in blocked.text
    env.clock.now += 61
    assert env.client("10.0.0.4").login("alice", alice.password, alice.code()).status_code == 303


def test_per_source_rate_limit_blocks_that_source_only(make_env: MakeEnv) -> None:
    """Failures for many usernames from one address block that address, not others."""
    env = make_env(login_attempts_per_source=4, login_attempts_per_user=100)
    alice = env.add_user("alice")
    for name in ("bob", "carol", "dave", "erin"):
        assert env.client("192.0.2.9").login(name, "guess-guess", "").status_code == 401
    assert env.client("192.0.2.9").login("alice", alice.password, alice.code()).status_code == 429
    assert env.client("192.0.2.10").login("alice", alice.password, alice.code()).status_code == 303


def test_failed_login_takes_the_same_time_for_unknown_users(make_env: MakeEnv) -> None:
    """A failed login costs about as long whether or not the username exists."""
    env = make_env(login_attempts_per_user=0, login_attempts_per_source=0)
    env.add_user("alice")
    client = env.client()
    known: list[float] = []
    unknown: list[float] = []
    for _ in range(7):
        for name, times in (("alice", known), ("nobody", unknown)):
            csrf = client.login_csrf()
            data = {"username": name, "password": "wrong password", "code": "", "csrf": csrf}
            start = time.perf_counter()
            assert client.http.post("/login", data=data).status_code == 401
            times.append(time.perf_counter() - start)
    ratio = statistics.median(known) / statistics.median(unknown)
    assert 0.6 < ratio < 1.6, (known, unknown)


def test_logins_are_audited_without_secrets(env: PortalEnv) -> None:
    """Login ok and failed are audited with user and source, never the password or code."""
    alice = env.add_user("alice")
    code = alice.code()
    env.client().login("alice", "Wrong-Password-123", "")
    env.client().login("alice", alice.password, code)
    with env.sessions() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.action.like("portal.%"))))
    assert [e.action for e in events] == ["portal.login_failed", "portal.login_ok"]
    assert all(e.actor == "alice" and e.source_ip == "testclient" for e in events)
    text = repr([(e.actor, e.target, e.detail) for e in events])
    assert "Wrong-Password-123" not in text
    assert alice.password not in text
    assert code not in text


def test_logout_revokes_the_session_server_side(env: PortalEnv) -> None:
    """After logout the old cookie no longer opens any page, even if replayed."""
    alice = env.add_user("alice")
    client = env.client()
    client.login_user(alice)
    old_cookie = client.http.cookies.get("rly_session")
    assert old_cookie
    assert client.post("/logout").headers["location"] == "/login"
    replay = env.client()
    replay.http.cookies.set("rly_session", old_cookie)
    assert replay.http.get("/devices").status_code == 303
    with env.sessions() as s:
        assert s.scalars(select(PortalSession.revoked)).all() == [True]


def test_logout_without_csrf_is_refused(env: PortalEnv) -> None:
    """POST /logout without the CSRF token is 403 and the session stays valid."""
    alice = env.add_user("alice")
    client = env.client()
    client.login_user(alice)
    assert client.post("/logout", csrf=False).status_code == 403
    assert client.http.get("/devices").status_code == 200


def test_login_without_form_token_is_refused(env: PortalEnv) -> None:
    """A login POST lacking the form's CSRF cookie/token pair is 403 and creates nothing."""
    alice = env.add_user("alice")
    data = {"username": "alice", "password": alice.password, "code": alice.code(), "csrf": "x"}
    response = env.client().http.post("/login", data=data)
    assert response.status_code == 403
    assert env.count(PortalSession) == 0


def test_login_redirects_only_to_same_site_paths(env: PortalEnv) -> None:
    """`next` may name a local path; absolute, protocol-relative and odd URLs go to /."""
    alice = env.add_user("alice")
    hostile = [
        "https://evil.example/",
        "//evil.example/x",
        "/\\evil.example",
        "\\\\evil.example",
        "javascript:alert(1)",
        "/\t/evil.example",
        "http:/evil.example",
    ]
    for step, target in enumerate(hostile):
        env.clock.now += 30 * (step + 1)  # a fresh TOTP step for each login
        response = env.client().login("alice", alice.password, alice.code(), next_path=target)
        assert response.status_code == 303
        assert response.headers["location"] == "/", target
    env.clock.now += 30 * 20
    response = env.client().login("alice", alice.password, alice.code(), next_path="/approve/abc")
    assert response.headers["location"] == "/approve/abc"


def test_pages_redirect_to_login_with_next(env: PortalEnv) -> None:
    """An anonymous visit to an approval link goes to /login and keeps the link as `next`."""
    response = env.client().http.get("/approve/some-token")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fapprove%2Fsome-token"
