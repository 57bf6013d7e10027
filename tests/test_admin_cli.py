"""The admin commands of `rly`: audit windows and limits, and prompts that end early."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
import pytest

from core import audit
from core.db import make_engine, make_sessions, upgrade
from core.models import Device
from rly.cli import main
from tests.support.rly_server import REPO_ROOT


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir holding a migrated database with account acme."""
    path = tmp_path / "rly-data"
    assert rly("account", "add", "acme", data_dir=path) == 0
    return path


def rly(*args: str, data_dir: Path) -> int:
    """`rly ARGS --data-dir DIR` in this process (main() sets a umask: put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    try:
        return main([*args, "--data-dir", str(data_dir)])
    finally:
        os.umask(mask)


def add_events(data_dir: Path, count: int) -> None:
    url = f"sqlite:///{data_dir / 'rly.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        with make_sessions(engine)() as session, session.begin():
            for n in range(count):
                audit.record(session, action="test.event", detail=f"event-{n:02d}")
    finally:
        engine.dispose()


def test_audit_limit_keeps_the_newest_rows_in_order(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rly audit --limit 3` prints the 3 newest events of the window, oldest of them first."""
    add_events(data_dir, 10)
    capsys.readouterr()
    assert rly("audit", "--limit", "3", data_dir=data_dir) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["event-07", "event-08", "event-09"]
    assert rly("audit", data_dir=data_dir) == 0
    everything = capsys.readouterr().out.splitlines()
    assert len(everything) == 11 and "account.add" in everything[0]  # the default limit is 1000


@pytest.mark.parametrize("limit", ["0", "-5"])
def test_audit_refuses_a_limit_below_one(
    data_dir: Path, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    """A zero or negative --limit is refused with one line and exit code 2."""
    capsys.readouterr()
    assert rly("audit", "--limit", limit, data_dir=data_dir) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"rly: --limit must be at least 1, got {limit}\n"


def spawn_user_add(data_dir: Path) -> pexpect.spawn:
    argv = ["-m", "rly", "user", "add", "bob", "--account", "acme", "--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLY_")}
    child = pexpect.spawn(
        sys.executable, argv, cwd=str(REPO_ROOT), env=env, encoding="utf-8", timeout=20
    )
    child.expect("Password: ")
    return child


def finish(child: pexpect.spawn) -> tuple[int | None, str]:
    child.expect(pexpect.EOF)
    child.close()
    before = child.before
    assert isinstance(before, str)
    return child.exitstatus, before


def test_ctrl_d_at_the_password_prompt_is_one_line(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-D at either password prompt of `rly user add` prints one line, exits 2, adds no one."""
    first = spawn_user_add(data_dir)
    first.sendeof()
    status, output = finish(first)
    assert status == 2
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if line.strip()] == [
        "rly: no password given (end of input at the prompt)"
    ]
    second = spawn_user_add(data_dir)
    second.sendline("long enough password")
    second.expect("Repeat password: ")
    second.sendeof()
    status, output = finish(second)
    assert status == 2 and "Traceback" not in output
    assert "rly: no password given" in output
    capsys.readouterr()
    assert rly("audit", data_dir=data_dir) == 0
    assert "user.add" not in capsys.readouterr().out


def test_ctrl_c_at_the_password_prompt_is_one_line(data_dir: Path) -> None:
    """Ctrl-C at the password prompt prints one line and exits 130, without a traceback."""
    child = spawn_user_add(data_dir)
    child.sendintr()
    status, output = finish(child)
    assert status == 130
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if line.strip()] == ["rly: interrupted"]


def test_device_list_shows_hostnames_and_serials_whole(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rly device list` cuts no hostname or serial, so each can be pasted into a command."""
    hostname, serial = "a-hostname-much-longer-than-twenty", "SERIAL-0123456789-ABCDEFGH"
    url = f"sqlite:///{data_dir / 'rly.sqlite3'}"
    engine = make_engine(url)
    try:
        with make_sessions(engine)() as session, session.begin():
            session.add(
                Device(id="dddddddddd", account_id=1, hostname=hostname, serial=serial,
                       public_key="k", key_fingerprint="SHA256:fp", status="accepted")
            )  # fmt: skip
    finally:
        engine.dispose()
    capsys.readouterr()
    assert rly("device", "list", data_dir=data_dir) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert row.split() == ["dddddddddd", "offline", "acme", hostname, serial, "never", "SHA256:fp"]
    assert header.index("SERIAL") == row.index(serial)  # the columns still line up
