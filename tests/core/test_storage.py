"""Storage: the same migrations and data functions on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from core import accounts, approvals, devices, totp
from core.db import make_engine, make_sessions, upgrade
from core.models import Account, Approval, AuditEvent, Base, Device, EnrollToken, User
from core.validate import InvalidInput, new_id


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'rly.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    upgrade(url)
    engine = make_engine(url)
    if request.param == "postgresql":
        with engine.begin() as conn:  # one database per run: empty it for this test
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
    try:
        yield make_sessions(engine)
    finally:
        engine.dispose()


def test_migrations_create_every_model_table(sessions: sessionmaker[Session]) -> None:
    """After `upgrade` every table of the typed schema exists, and upgrading again is a no-op."""
    with sessions() as session:
        bind = session.get_bind()
        names = set(inspect(bind).get_table_names())
        upgrade(bind.url.render_as_string(hide_password=False))
    assert set(Base.metadata.tables) <= names
    assert "alembic_version" in names


def test_account_user_and_audit(sessions: sessionmaker[Session]) -> None:
    """Adding an account and a user stores an argon2 hash, a TOTP secret and audit rows."""
    with sessions() as s, s.begin():
        accounts.add_account(s, name="acme", actor="test")
        accounts.add_user(
            s,
            username="alice",
            account_name="acme",
            role="admin",
            password="correct horse",
            actor="test",
        )
    with sessions() as s:
        user = s.scalars(select(User)).one()
        assert user.password_hash.startswith("$argon2")
        assert "correct horse" not in user.password_hash
        actions = list(s.scalars(select(AuditEvent.action).order_by(AuditEvent.id)))
    assert actions == ["account.add", "user.add"]


def test_bad_input_changes_nothing(sessions: sessionmaker[Session]) -> None:
    """A refused admin command leaves no rows behind."""
    with sessions() as s, s.begin():
        accounts.add_account(s, name="acme", actor="test")
    for bad in (
        lambda s: accounts.add_account(s, name="acme", actor="t"),
        lambda s: accounts.add_user(
            s,
            username="Bob!",
            account_name="acme",
            role="admin",
            password="long enough pw",
            actor="t",
        ),
        lambda s: accounts.add_user(
            s,
            username="bob",
            account_name="nope",
            role="admin",
            password="long enough pw",
            actor="t",
        ),
        lambda s: accounts.add_user(
            s,
            username="bob",
            account_name="acme",
            role="root",
            password="long enough pw",
            actor="t",
        ),
    ):
        with pytest.raises(InvalidInput), sessions() as s, s.begin():
            bad(s)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Account)) == 1
        assert s.scalar(select(func.count()).select_from(User)) == 0
        assert s.scalar(select(func.count()).select_from(AuditEvent)) == 1


def test_totp_step_is_accepted_once_under_concurrency(sessions: sessionmaker[Session]) -> None:
    """Twenty threads presenting one TOTP code: exactly one consumes it."""
    with sessions() as s, s.begin():
        accounts.add_account(s, name="acme", actor="test")
        user = accounts.add_user(
            s,
            username="alice",
            account_name="acme",
            role="admin",
            password="correct horse",
            actor="test",
        )
    code = pyotp.TOTP(user.totp_secret).now()
    wins: list[bool] = []
    barrier = threading.Barrier(20)

    def attempt() -> None:
        barrier.wait()
        with sessions() as s, s.begin():
            wins.append(totp.consume_code(s, s.get_one(User, user.id), code))

    threads = [threading.Thread(target=attempt) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


def test_totp_window(sessions: sessionmaker[Session]) -> None:
    """A code from the previous step is accepted; one from three steps back is refused."""
    with sessions() as s, s.begin():
        accounts.add_account(s, name="acme", actor="test")
        user = accounts.add_user(
            s,
            username="alice",
            account_name="acme",
            role="admin",
            password="correct horse",
            actor="test",
        )
    now = 1_800_000_000.0
    gen = pyotp.TOTP(user.totp_secret)
    with sessions() as s, s.begin():
        assert not totp.consume_code(s, s.get_one(User, user.id), gen.at(now - 90), now)
        assert totp.consume_code(s, s.get_one(User, user.id), gen.at(now - 30), now)


def test_enroll_token_is_stored_hashed(sessions: sessionmaker[Session]) -> None:
    """Only the SHA-256 of an enrollment token reaches the database."""
    with sessions() as s, s.begin():
        account = accounts.add_account(s, name="acme", actor="test")
        token = devices.create_enroll_token(
            s, account_id=account.id, auto_accept=False, uses=2, ttl=3600, actor="test"
        )
    with sessions() as s:
        row = s.scalars(select(EnrollToken)).one()
    assert row.token_hash == devices.token_hash(token) and token not in row.token_hash
    assert row.uses_left == 2


def test_enroll_tokens_never_look_like_a_command_line_option(
    sessions: sessionmaker[Session],
) -> None:
    """A token starting with "-" broke `rly-client enroll --token T`; all carry a fixed prefix."""
    with sessions() as s, s.begin():
        account = accounts.add_account(s, name="acme", actor="test")
        tokens = [
            devices.create_enroll_token(
                s, account_id=account.id, auto_accept=False, uses=1, ttl=60, actor="test"
            )
            for _ in range(50)
        ]
    assert all(t.startswith(devices.ENROLL_TOKEN_PREFIX) for t in tokens)
    assert len(set(tokens)) == 50


def test_concurrent_approvals_have_one_winner(sessions: sessionmaker[Session]) -> None:
    """Two portal users approving one token at once: exactly one decision is stored."""
    with sessions() as s, s.begin():
        accounts.add_account(s, name="acme", actor="test")
        users = [
            accounts.add_user(
                s,
                username=f"u{i}",
                account_name="acme",
                role="technician",
                password="correct horse",
                actor="test",
            )
            for i in range(8)
        ]
        approval, token = approvals.create_approval(
            s,
            ssh_login="partner",
            required_user_id=None,
            client_ip="127.0.0.1",
            client_version="SSH-2.0-test",
            relay_node="n1",
            ttl=60,
        )
    assert approval.token_hash != token
    results: list[str] = []
    barrier = threading.Barrier(len(users))

    def decide(user: User) -> None:
        barrier.wait()
        try:
            with sessions() as s, s.begin():
                approvals.decide(
                    s,
                    token=token,
                    user=s.get_one(User, user.id),
                    approve=True,
                    source_ip="127.0.0.1",
                )
            results.append("won")
        except approvals.ApprovalError:
            results.append("lost")

    threads = [threading.Thread(target=decide, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("won") == 1
    with sessions() as s:
        assert s.scalars(select(Approval.status)).one() == "approved"


def test_device_accept_revoke_and_allowlist(sessions: sessionmaker[Session]) -> None:
    """Accept and revoke change status and request a tunnel close; allowlists match CIDRs."""
    with sessions() as s, s.begin():
        account = accounts.add_account(s, name="acme", actor="test")
        device = Device(
            id=new_id(),
            account_id=account.id,
            hostname="nas1",
            serial="S1",
            public_key="ssh-ed25519 AAAA",
            key_fingerprint="SHA256:x",
        )
        s.add(device)
    with sessions() as s, s.begin():
        devices.accept_device(s, device_id=device.id, actor="test")
    with sessions() as s, s.begin():
        devices.revoke_device(s, device_id=device.id, actor="test")
        with pytest.raises(InvalidInput):
            devices.revoke_device(s, device_id=device.id, actor="test")
    with sessions() as s, s.begin():
        row = s.get_one(Device, device.id)
        assert (row.status, row.tunnel_request) == ("revoked", "close")
        devices.add_allowlist(s, account_id=account.id, cidr="10.0.0.0/8", actor="test")
        cidrs = devices.allowlist_for(s, account.id)
    assert devices.address_allowed(cidrs, "10.1.2.3")
    assert not devices.address_allowed(cidrs, "192.168.1.1")
    assert devices.address_allowed([], "192.168.1.1")
