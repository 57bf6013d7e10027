"""The technician port end to end: real `rly serve`, the OpenSSH client, approvals in the DB."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.relay.device_port_support import wait_until
from tests.relay.test_technician_support import TechDb, approval_token, approve
from tests.support.rly_server import RlyFactory, RlyServer
from tests.support.technician import TechnicianFactory

CONFIG = {"relay": {"connect_timeout": "2s", "approval_ttl": "30s"}}


@pytest.fixture
def relay(rly_factory: RlyFactory) -> RlyServer:
    return rly_factory(config=CONFIG)


@pytest.fixture
def db(relay: RlyServer) -> Iterator[TechDb]:
    handle = TechDb(relay.data_dir)
    try:
        account = handle.add_account("acme")
        handle.add_user("alice", "acme")
        handle.add_account("other")
        handle.add_user("mallory", "other")
        assert account
        yield handle
    finally:
        handle.close()


def test_approval_url_then_menu_within_a_second(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """The session prints the approval URL and code; approving shows the menu within a second."""
    tech = technician_factory(relay.technician_port)
    token = approval_token(tech)
    tech.expect(r"Verification code: [A-Z2-9]{3}-[A-Z2-9]{3}")
    tech.expect(r"Waiting for approval: \d+:\d\d left")
    approval = db.approval(token)
    assert approval.client_version.startswith("SSH-2.0-OpenSSH")
    assert approval.client_ip == "127.0.0.1"
    started = time.monotonic()
    db.decide(token, "alice")
    tech.expect(re.escape("rly:alice@acme> "), timeout=3)
    assert time.monotonic() - started < 1.0
    assert "account acme" in tech.output
    tech.sendline("whoami")
    tech.expect("alice, account acme")
    tech.sendline("exit")
    assert tech.expect_eof() == 0


def test_reject_disconnects_at_once(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """A rejected approval ends the SSH session in under a second with a non-zero status."""
    tech = technician_factory(relay.technician_port)
    token = approval_token(tech)
    started = time.monotonic()
    db.decide(token, "alice", approve=False)
    status = tech.expect_eof(timeout=3)
    assert time.monotonic() - started < 1.0
    assert status not in (0, None)
    assert "rejected" in tech.output


def test_wrong_account_device_is_not_revealed(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """A device of another account gets the seed's 'Could not find matching clients'."""
    other = db.add_account("third")
    device_id = db.add_named_device(other, hostname="secret-box")
    tech = technician_factory(relay.technician_port)
    approve(tech, db, "alice")
    tech.sendline(f"connect {device_id}")
    tech.expect("Could not find matching clients")
    tech.sendline("c secret-box")
    tech.expect("Could not find matching clients")
    assert "third" not in tech.output


def test_device_never_checked_in(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """A device of the account that never checked in gets 'Client not found...'."""
    db.add_named_device(1, hostname="Quiet-Box", checked_in=False)  # account 1 is acme
    tech = technician_factory(relay.technician_port)
    approve(tech, db, "alice")
    tech.sendline("sd quiet-box")
    tech.expect("Client not found. It may not be checking in")
    tech.expect("never seen")


def test_checked_in_device_without_tunnel_gives_up(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """A device that checks in without a tunnel: 'Waiting for connection...', then giving up."""
    device_id = db.add_named_device(1, hostname="nas-1")
    tech = technician_factory(relay.technician_port)
    approve(tech, db, "alice")
    tech.sendline("connect nas-1")
    tech.expect(re.escape("Waiting for connection..."))
    started = time.monotonic()
    tech.expect("Giving up. Cannot connect", timeout=5)
    assert 1.5 < time.monotonic() - started < 4
    assert db.device(device_id).tunnel_request == "open"
    tech.sendline("whoami")
    tech.expect("alice, account acme")
    wait_until(lambda: db.actions("approval.approved"))


def test_list_pages_and_filters(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """list pages the account's devices by 20, filters by pattern and strips control chars."""
    for i in range(23):
        db.add_named_device(1, hostname=f"site-{i:02d}")
    db.add_named_device(1, hostname="evil\x1b[2Jname")
    tech = technician_factory(relay.technician_port)
    approve(tech, db, "alice")
    tech.sendline("list site")
    tech.expect(r"Page 1 of 2 \(23 devices\)\. Next: list site --page 2")
    assert "site-19" in tech.output and "site-20" not in tech.output
    tech.sendline("list site --page 2")
    tech.expect("site-22")
    tech.expect("Page 2 of 2")
    tech.sendline("list EVIL")
    tech.expect(r"evil\[2Jname")
    assert "\x1b[2J" not in tech.output
    tech.sendline("list nothing-like-this")
    tech.expect("No devices match.")


def test_repair_reports_each_step(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """repair prints its steps, asks the device to reconnect, and reports the outcome."""
    device_id = db.add_named_device(1, hostname="nas-2")
    tech = technician_factory(relay.technician_port)
    approve(tech, db, "alice")
    tech.sendline("repair NAS-2")
    tech.expect("Step 1: no tunnel on this relay to drop.")
    tech.expect("Step 2: asking the device")
    tech.expect("Repair failed: no new tunnel came up.", timeout=5)
    assert db.device(device_id).tunnel_request == "reconnect"
    assert db.actions("device.repair")


def test_bad_lines_get_one_line_errors(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """Unknown commands and malformed arguments are answered with one line and the menu stays."""
    tech = technician_factory(relay.technician_port)
    approve(tech, db, "alice")
    tech.sendline("reboot now; rm -rf /")
    tech.expect("Unknown command 'reboot'")
    tech.sendline("list --page zero")
    tech.expect("--page must be a number")
    tech.sendline("help")
    tech.expect(r"connect DEVICE \[COMMAND...\]")
    tech.sendline("whoami")
    tech.expect("alice, account acme")
