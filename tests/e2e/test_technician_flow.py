"""The technician flow with every real part.

The technician is OpenSSH `ssh` in a PTY, approvals are clicked in headless
Chromium, the device is a real `rly-client` holding its tunnel, and the device's
target is a real sshd trusting the relay's user CA. One relay (with its
devices and logged-in browser contexts) is shared by the module to keep it fast;
each test leaves the shared device online or waits for it to come back.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect
from sqlalchemy import func, select

from core import approvals
from core.models import AuditEvent, Tunnel
from tests.e2e.stack import DeviceUnderTest, Stack, wait_for
from tests.e2e.technician_support import (
    LOGIN_FAILED,
    PortalBrowser,
    PortalUser,
    add_portal_user,
    approval_request,
    prompt,
)
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory
from tests.support.sshd import SshdFactory
from tests.support.technician import Technician, TechnicianFactory

pytestmark = pytest.mark.slow

CONFIG = {
    "relay": {"connect_timeout": "2s", "keepalive_interval": "2s", "keepalive_count": 2},
}
ALICE = prompt("alice", "acme")
MALLORY = prompt("mallory", "other")


@dataclass
class World:
    """The shared relay: account acme with three devices, portal users logged in as needed."""

    stack: Stack
    nas: DeviceUnderTest  # online: rly-client running, target a real sshd
    gone: DeviceUnderTest  # checked in and online at set-up; one test stops its client
    quiet: DeviceUnderTest  # enrolled, its client never ran
    alice: PortalBrowser
    mallory: PortalBrowser
    carol: PortalUser  # enrolled by nobody yet: the TOTP replay test's own user
    browser: Browser

    @property
    def port(self) -> int:
        return self.stack.server.technician_port

    def menu(self, factory: TechnicianFactory, portal: PortalBrowser | None = None) -> Technician:
        """An `ssh partner@relay` session approved in the browser, at the menu prompt."""
        portal = portal or self.alice
        tech = factory(self.port)
        portal.approve(*approval_request(tech))
        tech.expect(prompt(portal.user.username, portal.user.account), timeout=5)
        return tech

    def report(self) -> str:
        server = self.stack.server.process
        return "\n".join([self.stack.processes.report(), server.tail(80) if server else ""])


def _devices(stack: Stack) -> list[DeviceUnderTest]:
    """Enroll (one after another: Stack names devices by count) and start the shared devices."""
    nas = stack.enroll_device(hostname="Nas-Main", serial="SN-MAIN-1")
    nas.start()
    gone = stack.enroll_device(hostname="gone-box", serial="SN-GONE", target="builtin")
    gone.start()
    quiet = stack.enroll_device(hostname="quiet-box", serial="SN-QUIET", target="builtin")
    return [nas, gone, quiet]


def _users(stack: Stack) -> list[PortalUser]:
    """alice and carol of acme, mallory of account other, made with `rly user add`."""
    stack.server.run_cli("account", "add", "other", check=True)
    names = (("alice", "acme"), ("mallory", "other"), ("carol", "acme"))
    return [add_portal_user(stack.server, name, account=account) for name, account in names]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> Iterator[World]:
    """One `rly serve` (connect_timeout 2s) with three devices and three portal users."""
    workdir: Path = tmp_path_factory.mktemp("technician-flow")
    servers, processes, sshds = RlyFactory(workdir), ProcessFactory(workdir), SshdFactory(workdir)
    portals: list[PortalBrowser] = []
    try:
        stack = Stack(servers(config=CONFIG), processes, sshds, workdir)
        with ThreadPoolExecutor(2) as pool:  # CLI start-ups dominate: run both lists at once
            devices, users = pool.submit(_devices, stack), pool.submit(_users, stack)
            nas, gone, quiet = devices.result()
            alice, mallory, carol = users.result()
        for user in (alice, mallory):  # the browser stays in this thread (Playwright sync API)
            portals.append(PortalBrowser(browser.new_context(), stack.server, user))
            portals[-1].log_in()
        for device in (nas, gone):
            stack.wait_online(device.id)
        yield World(stack, nas, gone, quiet, portals[0], portals[1], carol, browser)
    finally:
        for portal in portals:
            portal.close()
        processes.stop_all()
        sshds.stop_all()
        servers.stop_all()


def _closed_at(stack: Stack, tunnel_id: int) -> datetime | None:
    with stack.db() as s:
        return s.get_one(Tunnel, tunnel_id).closed_at


def _other_tunnel(stack: Stack, device_id: str, old_id: int) -> Tunnel | None:
    tunnel = stack.open_tunnel(device_id)
    return tunnel if tunnel is not None and tunnel.id != old_id else None


@pytest.fixture(autouse=True)
def _report_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the shared processes' output tails when a test using them failed."""
    failed_before = request.session.testsfailed
    yield
    if "world" in request.fixturenames and request.session.testsfailed > failed_before:
        print(request.getfixturevalue("world").report())


def test_approved_session_lists_connects_and_returns_to_menu(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """A browser approval gives the menu in 1 s; list, connect, resize, show and close all work."""
    stack, nas = world.stack, world.nas
    stack.wait_online(nas.id)
    tech = technician_factory(world.port)
    url, code = approval_request(tech)
    tech.expect(r"Waiting for approval: \d+:\d\d left")
    world.alice.open_request(url, code)
    clicked = world.alice.click("Approve")
    tech.expect(ALICE, timeout=5)
    assert time.monotonic() - clicked < 1.0
    world.alice.expect_outcome("Approved")
    assert "account acme" in tech.output

    tech.sendline("list")
    tech.expect(rf"{nas.id}\s+Nas-Main\s+SN-MAIN-1\s+online\s")
    tech.expect(ALICE)

    tech.sendline(f"connect {nas.id}")
    tech.sendline("echo uid=$(id -u); echo size=$(stty size)")
    tech.expect(r"uid=0\r?\n")
    tech.expect(r"size=24 80\r?\n")
    tech.resize(33, 101)
    time.sleep(0.3)  # SIGWINCH -> ssh -> relay -> device's PTY
    tech.sendline("echo size=$(stty size)")
    tech.expect(r"size=33 101\r?\n")
    tech.sendline("exit")
    tech.expect(f"Connection to {nas.id}")
    tech.expect(ALICE)

    for line, marker in (("connect NAS-MAIN", "by-host"), ("sd SN-MAIN-1", "by-serial")):
        tech.sendline(line)
        tech.sendline(f"echo {marker}-$((6*7))")
        tech.expect(f"{marker}-42")
        tech.sendline("exit")
        tech.expect(ALICE)

    other = world.menu(technician_factory)
    other.sendline(f"c {nas.id}")
    other.sendline("echo live-$((2+3))")
    other.expect("live-5")
    tech.sendline(f"show {nas.id}")
    port = stack.server.device_port
    tech.expect(rf"Device {nas.id} \(Nas-Main, serial SN-MAIN-1\): online")
    tech.expect(rf"Tunnel: relay \S+ port {port} over ssh, since [^\r\n]*from 127\.0\.0\.1:\d+")
    shown = tech.expect(rf"([\s\S]*?){ALICE}").group(1)
    sessions = re.findall(r"Session (\S+): user alice, from 127\.0\.0\.1, started", shown)
    assert len(sessions) == 1, shown  # the live one; the three ended sessions are not listed
    other.sendline("exit")
    other.expect(ALICE)

    first_tunnel = stack.open_tunnel(nas.id)
    assert first_tunnel is not None
    tech.sendline(f"close {nas.id}")
    tech.expect(f"Closed the tunnel of device {nas.id}")
    wait_for(lambda: _closed_at(stack, first_tunnel.id), 3, "the tunnel row closed")
    wait_for(  # rly-client reconnects (within milliseconds here: do not poll for offline)
        lambda: _other_tunnel(stack, nas.id, first_tunnel.id), nas.backoff_cap + 10, "new tunnel"
    )
    tech.sendline("exit")
    assert tech.expect_eof() == 0


def test_reject_disconnects_at_once(world: World, technician_factory: TechnicianFactory) -> None:
    """Reject in the browser ends the SSH session in under a second with a non-zero status."""
    tech = technician_factory(world.port)
    url, code = approval_request(tech)
    world.alice.open_request(url, code)
    clicked = world.alice.click("Reject")
    status = tech.expect_eof(timeout=5)
    assert time.monotonic() - clicked < 1.0
    assert status not in (0, None)
    assert "The request was rejected in the portal. Disconnecting." in tech.output
    world.alice.expect_outcome("Rejected")
    world.alice.page.goto(world.stack.server.rebase(url))  # and the link is spent
    expect(world.alice.page.get_by_role("status")).to_have_text(
        "This request was already rejected."
    )


def test_approval_expires_with_a_message(
    rly_factory: RlyFactory, technician_factory: TechnicianFactory
) -> None:
    """An approval left undecided past relay.approval_ttl (3s) prints a line and disconnects."""
    server = rly_factory(config={"relay": {"approval_ttl": "3s"}})
    tech = technician_factory(server.technician_port)
    approval_request(tech)
    shown = time.monotonic()
    tech.expect(r"Waiting for approval: 0:0[0-3] left")
    tech.expect(re.escape("The approval request expired. Disconnecting."), timeout=6)
    assert 2.0 < time.monotonic() - shown < 5.0
    assert tech.expect_eof(timeout=3) not in (0, None)


def test_used_approval_url_shows_already_decided(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """Opening a used approval link again shows "already approved" and changes nothing."""
    tech = world.menu(technician_factory)
    url = re.search(r"http://\S+/approve/[A-Za-z0-9_-]+", tech.output)
    assert url is not None
    token = url.group(0).rsplit("/", 1)[1]

    def snapshot() -> tuple[str, int | None, object, int]:
        with world.stack.db() as s:
            row = approvals.find_by_token(s, token)
            assert row is not None
            events = s.scalar(
                select(func.count())
                .select_from(AuditEvent)
                .where(AuditEvent.target == f"approval:{row.id}")
            )
            return row.status, row.decided_by, row.decided_at, events or 0

    before = snapshot()
    assert before[0] == "approved"
    for portal in (world.alice, world.mallory):
        page = portal.page
        response = page.goto(world.stack.server.rebase(url.group(0)))
        assert response is not None and response.status == 410
        expect(page.get_by_role("heading", name="Request no longer open")).to_be_visible()
        expect(page.get_by_role("status")).to_have_text("This request was already approved.")
        assert page.get_by_role("button", name="Approve").count() == 0
    assert snapshot() == before
    tech.sendline("whoami")
    tech.expect("alice, account acme")


def test_other_account_user_cannot_reach_the_device(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """A session approved by another account's user gets 'Could not find matching clients'."""
    tech = world.menu(technician_factory, world.mallory)
    tech.sendline(f"connect {world.nas.id}")
    tech.expect("Could not find matching clients")
    tech.expect(MALLORY)
    tech.sendline("connect nas-main")
    tech.expect("Could not find matching clients")
    tech.expect(MALLORY)
    tech.sendline("list")
    tech.expect("This account has no devices yet.")
    assert "SN-MAIN-1" not in tech.output


def test_device_that_never_checked_in(world: World, technician_factory: TechnicianFactory) -> None:
    """A device whose client never ran gets 'Client not found. It may not be checking in'."""
    assert world.stack.device_row(world.quiet.id).last_checkin_at is None
    tech = world.menu(technician_factory)
    tech.sendline("connect Quiet-Box")
    tech.expect(re.escape("Client not found. It may not be checking in"))
    tech.expect(ALICE)


def test_checked_in_device_without_tunnel_gives_up(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """A device that checked in but holds no tunnel: 'Waiting for connection...', then giving up."""
    stack, gone = world.stack, world.gone
    wait_for(lambda: stack.device_row(gone.id).last_checkin_at, 10, "gone-box check-in")
    assert gone.process is not None
    gone.process.stop()
    stack.wait_offline(gone.id, timeout=5)
    tech = world.menu(technician_factory)
    tech.sendline("connect gone-box")
    tech.expect(re.escape("Waiting for connection..."))
    waiting = time.monotonic()
    tech.expect(re.escape("Giving up. Cannot connect"), timeout=6)
    assert 1.5 < time.monotonic() - waiting < 4.0  # relay.connect_timeout = 2s
    tech.expect(ALICE)


def test_exec_connect_passes_exit_status(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """`ssh -t partner@relay connect DEV 'exit 7'`, approved in the browser meanwhile, exits 7."""
    world.stack.wait_online(world.nas.id, timeout=15)
    tech = technician_factory(
        world.port, args=["-t"], command=["connect", world.nas.id, "echo ran-$((40+2)); exit 7"]
    )
    world.alice.approve(*approval_request(tech))
    tech.expect("ran-42")
    assert tech.expect_eof() == 7


def test_totp_code_replay_is_refused(world: World) -> None:
    """Logging in again with a TOTP code already used in its step is refused."""
    user = world.carol
    carol = PortalBrowser(world.browser.new_context(), world.stack.server, user)
    try:
        carol.log_in()  # first login: password, then the authenticator is enrolled
        carol.log_out()
        code = user.fresh_code()
        carol.submit_login(code)
        carol.expect_logged_in()
        carol.log_out()
        carol.submit_login(code)
        expect(carol.page.get_by_role("alert")).to_have_text(LOGIN_FAILED)
        assert carol.page.get_by_role("button", name="Log out").count() == 0
        assert user.last_step is not None
        assert user.last_step >= int(time.time() // 30) - 1  # the code itself is still current
    finally:
        carol.close()


def test_relay_stops_promptly_while_a_device_long_polls(stack: Stack) -> None:
    """SIGTERM stops `rly serve` within 3 s, with no error, while a device is long-polling."""
    device = stack.enroll_device(hostname="poller", target="builtin")
    device.start()
    tunnel = stack.wait_online(device.id)

    def checked_in_since_tunnel() -> datetime | None:
        last = stack.device_row(device.id).last_checkin_at
        return last if last is not None and last > tunnel.connected_at else None

    # a check-in after the tunnel came up is either the long poll (25 s by default) or an
    # immediate report followed, at most 1 s later, by the long poll
    wait_for(checked_in_since_tunnel, 10, "a check-in after the tunnel came up")
    time.sleep(1.5)
    started = time.monotonic()
    assert stack.server.stop(timeout=20) == 0
    stopped = time.monotonic() - started
    assert "Exception in ASGI application" not in stack.server.output  # a cancelled long poll
    assert stopped < 3.0
