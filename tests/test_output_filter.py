"""One output filter (core.text.printable) between stored text and every page or terminal line.

A device row is written straight into the database with control characters,
bidi overrides, zero-width and separator characters in its text (as an older
row, a migration or another writer could leave it); the portal pages, the
relay menu and the `rly` CLI of a real `rly serve` show it escaped.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass

import asyncssh
import httpx
import pyotp
import pytest
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Device, User
from core.text import finalize, printable, printable_lines
from tests.relay.device_port_support import new_key
from tests.relay.test_technician_support import PASSWORD, URL_RE, TechDb
from tests.support.rly_server import RlyServer

# ESC[2J (clear screen), BEL, CR, DEL, C1 CSI, RLO bidi override, LRI isolate, zero-width
# space, BOM, line separator, no-break space: none may arrive raw. (A lone surrogate, which
# the relay's surrogateescape channel would send as a raw byte, cannot be stored as UTF-8.)
HOSTILE = "box\x1b[2J\x07\r\x7f\x9b\u202e\u2066\u200b\ufeff\u2028\u00a0-1"
ESCAPED = r"box\x1b[2J\x07\x0d\x7f\x9b\u202e\u2066\u200b\ufeff\u2028\xa0-1"
RAW = [ch for ch in HOSTILE if not ch.isprintable()]


def test_printable_escapes_each_class_and_keeps_text() -> None:
    """C0, DEL, C1, bidi, zero-width, separators and surrogates become visible escapes;
    letters of any script, emoji and the ASCII space stay as they are."""
    assert printable(HOSTILE) == ESCAPED
    assert printable("a\udc9b") == r"a\udc9b"  # a lone surrogate (surrogateescape's 0x9b)
    assert printable("Zürich 東京 ✓ a b") == "Zürich 東京 ✓ a b"
    assert printable("\U000e0001") == r"\U000e0001"  # a tag character (Cf) above the BMP
    assert printable_lines("a\x1b\nb\tc") == "a\\x1b\nb\\x09c"
    assert finalize(Markup("<b>\x1b</b>\n")) == Markup("<b>\\x1b</b>\n")
    assert finalize(3) == 3


@dataclass
class Env:
    relay: RlyServer
    db: TechDb
    device_id: str
    secret: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    relay = RlyServer(tmp_path_factory.mktemp("output-filter"))
    db: TechDb | None = None
    try:
        relay.start()
        db = TechDb(relay.data_dir)
        account = db.add_account("acme")
        db.add_user("alice", "acme")
        device_id = db.add_named_device(account, hostname="box-1", key=new_key())

        def tamper(session: Session) -> str:  # another writer, past the tracker's checks
            device = session.get(Device, device_id)
            assert device is not None
            device.hostname = HOSTILE
            device.serial = HOSTILE
            device.os_name = HOSTILE
            device.client_version = HOSTILE
            user = session.scalar(select(User).where(User.username == "alice"))
            assert user is not None
            user.totp_confirmed = True
            return str(user.totp_secret)

        secret = db.run(tamper)
        yield Env(relay, db, device_id, secret)
    finally:
        if db is not None:
            db.close()
        relay.stop()


def _assert_nothing_raw(text: str) -> None:
    found = sorted({f"U+{ord(ch):04X}" for ch in text if ch in RAW})
    assert not found, f"raw characters reached the output: {found}"


def test_portal_pages_show_stored_text_escaped(env: Env) -> None:
    """The devices list and the device page (real HTTP) carry no raw control character."""
    with httpx.Client(base_url=env.relay.base_url, follow_redirects=False) as http:
        form = http.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf is not None
        code = pyotp.TOTP(env.secret).now()
        data = {"username": "alice", "password": PASSWORD, "code": code, "csrf": csrf.group(1)}
        assert http.post("/login", data=data).status_code == 303
        for path in ("/devices", f"/devices/{env.device_id}"):
            page = http.get(path)
            assert page.status_code == 200, path
            body = page.content.decode("utf-8", "surrogateescape")
            _assert_nothing_raw(body)
            assert r"box\x1b[2J\x07" in body, path  # shown, escaped


async def _menu(env: Env, command: str) -> str:
    """`ssh partner@relay COMMAND` (no PTY), approved as alice; the command's stdout."""
    async with asyncssh.connect(
        "127.0.0.1", env.relay.technician_port, username="partner", password="partner",
        known_hosts=None, agent_path=None, config=None, preferred_auth="password",
    ) as conn:  # fmt: skip
        process = await conn.create_process(command, encoding="utf-8", errors="surrogateescape")
        text = ""
        async with asyncio.timeout(10):
            while not (found := re.search(URL_RE, text)):
                chunk = await process.stderr.read(4096)
                assert chunk, text
                text += chunk
        await asyncio.to_thread(env.db.decide, found.group(2), "alice")
        async with asyncio.timeout(10):
            result = await process.wait()
        return str(result.stdout)


@pytest.mark.parametrize("command", ["list", "show {id}"])
def test_menu_lines_show_stored_text_escaped(env: Env, command: str) -> None:
    """The menu's `list` and `show` print the tampered row escaped, nothing raw."""
    out = asyncio.run(_menu(env, command.format(id=env.device_id)))
    assert env.device_id in out
    _assert_nothing_raw(out)
    assert r"\u2028" in out  # the separator is shown as an escape, not a line break


def test_cli_device_list_shows_stored_text_escaped(env: Env) -> None:
    """`rly device list` prints the tampered row escaped, nothing raw."""
    result = env.relay.run_cli("device", "list")
    assert result.returncode == 0, result.stderr
    assert env.device_id in result.stdout
    _assert_nothing_raw(result.stdout + result.stderr)
