"""Identity comes only from the auth step that succeeded (Warpgate CVE-2023-48712 class).

A raw asyncssh client switches usernames and methods in the middle of one
login, which OpenSSH cannot do: it offers alice's public key (public by
nature) with a wrong signature or without signing at all, then logs in as the
gate user. The session must be a plain gate session: any account user may
approve, the session acts as the approver, the audit row names the method
that really succeeded.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import pytest
from asyncssh.public_key import SSHLocalKeyPair

from core.approvals import ApprovalError
from tests.relay.device_port_support import new_key, wait_until
from tests.relay.test_technician_support import URL_RE, TechDb
from tests.support.rly_server import RlyServer

GATE = "partner"  # the documented, non-secret gate user and password


@dataclass
class Env:
    relay: RlyServer
    db: TechDb
    alice_key: asyncssh.SSHKey


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    relay = RlyServer(
        tmp_path_factory.mktemp("identity"), config={"relay": {"approval_ttl": "30s"}}
    )
    db: TechDb | None = None
    try:
        relay.start()
        db = TechDb(relay.data_dir)
        db.add_account("acme")
        db.add_user("alice", "acme")
        db.add_user("bob", "acme")
        key = new_key()
        db.add_user_key("alice", key)
        yield Env(relay, db, key)
    finally:
        if db is not None:
            db.close()
        relay.stop()


class ForgedKeyPair(SSHLocalKeyPair):
    """Offers someone else's public key; signs with another key, or cannot sign at all."""

    def __init__(self, public: asyncssh.SSHKey, *, signs: bool) -> None:
        other = asyncssh.generate_private_key(public.algorithm.decode())
        super().__init__(other, None, None, None)
        self.public_data = public.public_data
        self.signs = signs

    def sign(self, data: bytes) -> bytes:
        if not self.signs:
            raise ValueError("the private key is not held")
        return super().sign(data)  # a signature by the wrong key


@dataclass
class Switcher(asyncssh.SSHClient):
    """Offers `keys` as the connection's first username, then switches to `then_user`.

    asyncssh's client has no public API to change the username between auth
    requests (the protocol allows it per request); the attack needs it, so the
    client's `_username` is set before the next request is built.
    """

    keys: list[asyncssh.SSHKeyPair]
    then_user: str
    password: str = GATE
    stop_kbdint_after_password: bool = False
    instructions: list[str] = field(default_factory=list)
    conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    def _switch(self) -> None:
        assert self.conn is not None
        self.conn._username = self.then_user  # see the class docstring

    def public_key_auth_requested(self) -> asyncssh.SSHKeyPair | None:
        if not self.keys:
            return None
        if self.stop_kbdint_after_password:  # kbdint came first: the key is for then_user
            self._switch()
        return self.keys.pop(0)

    def password_auth_requested(self) -> str:
        self._switch()
        return self.password

    def kbdint_auth_requested(self) -> str:
        if not self.stop_kbdint_after_password:
            self._switch()
        return ""

    def kbdint_challenge_received(
        self, name: str, instructions: str, lang: str, prompts: list[tuple[str, bool]]
    ) -> list[str] | None:
        self.instructions.append(instructions)
        if prompts:
            return [self.password]
        return None if self.stop_kbdint_after_password else []


async def _login(
    env: Env, user: str, client: Switcher, methods: str
) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1", env.relay.technician_port, username=user, client_factory=lambda: client,
        known_hosts=None, agent_path=None, config=None, client_keys=None, password=None,
        preferred_auth=methods,
    )  # fmt: skip


async def _read_until(stream: asyncssh.SSHReader[str], pattern: str, timeout: float = 10) -> str:
    text = ""
    async with asyncio.timeout(timeout):
        while not re.search(pattern, text):
            chunk = await stream.read(4096)
            assert chunk, f"EOF before {pattern!r}: {text!r}"
            text += chunk
    return text


async def _approve_as(
    env: Env, conn: asyncssh.SSHClientConnection, client: Switcher, approver: str
) -> str:
    """Open a shell, approve its request (shown at login or in the shell) as `approver`;
    return the text up to the menu prompt."""
    process = await conn.create_process(term_type="xterm", term_size=(100, 24))
    text = "".join(client.instructions)
    if not re.search(URL_RE, text):
        text = await _read_until(process.stdout, URL_RE)
    token = re.search(URL_RE, text)
    assert token is not None
    assert env.db.approval(token.group(2)).required_user_id is None
    await asyncio.to_thread(env.db.decide, token.group(2), approver)
    text = await _read_until(process.stdout, r"rly:\w+@acme> ")
    process.stdin.write("exit\n")
    await process.wait_closed()
    return text


def _last_login(env: Env, actor: str, count_before: int) -> str:
    rows = wait_until(
        lambda: (
            len(env.db.actions("technician.login")) > count_before
            and [e for e in env.db.actions("technician.login") if e.actor == actor]
        )
    )
    return str(rows[-1].detail)


@pytest.mark.parametrize(
    ("signs", "methods"),
    [(True, "publickey,password"), (False, "publickey,keyboard-interactive")],
    ids=["bad-signature-then-password", "unsigned-offer-then-kbdint"],
)
def test_offered_key_then_gate_login_is_a_plain_gate_session(
    env: Env, signs: bool, methods: str
) -> None:
    """alice's key offered (bad or no signature), then the gate login: bob approves, acts as bob."""
    before = len(env.db.actions("technician.login"))
    client = Switcher([ForgedKeyPair(env.alice_key, signs=signs)], then_user=GATE)

    async def scenario() -> str:
        async with await _login(env, "alice", client, methods) as conn:
            return await _approve_as(env, conn, client, "bob")

    assert "rly:bob@acme> " in asyncio.run(scenario())
    method = "password" if "password" in methods else "keyboard-interactive"
    detail = _last_login(env, GATE, before)
    assert f"method={method} " in detail and "publickey" not in detail


def test_kbdint_request_does_not_carry_over_to_a_key_login_as_another_user(env: Env) -> None:
    """A kbdint round as the gate user, then alice's real key: only alice may approve, the
    request the kbdint round made is abandoned."""
    before = len(env.db.actions("technician.login"))
    alice = asyncssh.load_keypairs(env.alice_key)[0]
    client = Switcher([alice], then_user="alice", stop_kbdint_after_password=True)

    async def scenario() -> None:
        async with await _login(env, GATE, client, "keyboard-interactive,publickey") as conn:
            process = await conn.create_process(term_type="xterm", term_size=(100, 24))
            token = re.search(URL_RE, await _read_until(process.stdout, URL_RE))
            assert token is not None
            with pytest.raises(ApprovalError):
                await asyncio.to_thread(env.db.decide, token.group(2), "bob")
            await asyncio.to_thread(env.db.decide, token.group(2), "alice")
            await _read_until(process.stdout, re.escape("rly:alice@acme> "))
            process.close()

    asyncio.run(scenario())
    shown = re.search(URL_RE, "".join(client.instructions))
    assert shown is not None, client.instructions  # the kbdint round did make a request
    wait_until(lambda: env.db.approval(shown.group(2)).status == "abandoned")
    assert "method=publickey " in _last_login(env, "alice", before)


def test_alice_key_login_binds_alice(env: Env) -> None:
    """alice signing with her registered key: only alice may approve; audit method=publickey."""
    before = len(env.db.actions("technician.login"))
    keys = [
        ForgedKeyPair(env.alice_key, signs=True),
        asyncssh.load_keypairs(env.alice_key)[0],
    ]
    client = Switcher(keys, then_user="alice")  # a failed signature first, then the real one

    async def scenario() -> None:
        async with await _login(env, "alice", client, "publickey") as conn:
            process = await conn.create_process(term_type="xterm", term_size=(100, 24))
            token = re.search(URL_RE, await _read_until(process.stdout, URL_RE))
            assert token is not None
            assert env.db.approval(token.group(2)).required_user_id is not None
            with pytest.raises(ApprovalError):
                await asyncio.to_thread(env.db.decide, token.group(2), "bob")
            await asyncio.to_thread(env.db.decide, token.group(2), "alice")
            await _read_until(process.stdout, re.escape("rly:alice@acme> "))
            process.close()

    asyncio.run(scenario())
    assert "method=publickey " in _last_login(env, "alice", before)


def test_alice_key_as_bob_is_refused(env: Env, tmp_path: Path) -> None:
    """alice's key, correctly signed, does not log in as bob (and binds nothing for him)."""
    alice = asyncssh.load_keypairs(env.alice_key)[0]
    client = Switcher([alice], then_user="bob")

    async def scenario() -> None:
        with pytest.raises(asyncssh.PermissionDenied):
            await _login(env, "bob", client, "publickey")

    asyncio.run(scenario())


def test_kbdint_round_then_password_login_records_password(env: Env) -> None:
    """A kbdint round as the gate user, then a password login as the same user: the audit says
    password, the kbdint request is abandoned, the session asks with a request of its own."""
    before = len(env.db.actions("technician.login"))
    client = Switcher([], then_user=GATE, stop_kbdint_after_password=True)

    async def scenario() -> str:
        async with await _login(env, GATE, client, "keyboard-interactive,password") as conn:
            return await _approve_as(env, conn, Switcher([], then_user=GATE), "bob")

    assert "rly:bob@acme> " in asyncio.run(scenario())
    shown = re.search(URL_RE, "".join(client.instructions))
    assert shown is not None, client.instructions
    wait_until(lambda: env.db.approval(shown.group(2)).status == "abandoned")
    assert "method=password " in _last_login(env, GATE, before)
