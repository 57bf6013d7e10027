"""The Prometheus counters at /metrics of a real `rly serve` move with what they count.

One server, target sshd and OpenSSH device serve the module; each test reads
/metrics before and after one kind of event and checks the counter moved by
exactly that event (counters are per process, so deltas keep tests apart).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from approval_portal.auth import create_session, session_id
from core.models import PortalSession, User
from device_client.api import TrackerClient
from tests.relay.device_port_support import wait_until
from tests.relay.test_openssh_device import OpenSshDevice
from tests.relay.test_technician_support import URL_RE, TechDb, device_tunnel
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory, RlyServer
from tests.support.sshd import OpenSshd, SshdFactory
from tests.support.technician import Technician, TechnicianFactory

SHOW_URL: dict[str, str | None] = {"LogLevel": "INFO"}  # the login round shows the link
SAMPLE = re.compile(r"^(rly_\w+(?:\{[^}]*\})?) (\S+)$", re.M)


def scrape(server: RlyServer) -> dict[str, float]:
    """Every sample line of /metrics: 'name{labels}' -> value."""
    body = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return {name: float(value) for name, value in SAMPLE.findall(body)}


class Moved:
    """The change of each counter between construction and `delta()`."""

    def __init__(self, server: RlyServer) -> None:
        self.server = server
        self.before = scrape(server)

    def delta(self, name: str) -> float:
        return scrape(self.server).get(name, 0.0) - self.before.get(name, 0.0)


class Site:
    def __init__(self, workdir: Path) -> None:
        self.rlys = RlyFactory(workdir)
        self.sshds = SshdFactory(workdir)
        self.processes = ProcessFactory(workdir)
        self.server = self.rlys(config={"relay": {"connect_timeout": "3s"}})
        self.db = TechDb(self.server.data_dir)
        self.db.add_account("acme")
        self.db.add_user("alice", "acme")
        user_ca = (self.server.data_dir / "keys" / "user_ca.pub").read_text()
        self.target: OpenSshd = self.sshds(trusted_user_ca_keys=[user_ca])
        self.cookie, self.csrf = self._portal_session("alice")

    def _portal_session(self, username: str) -> tuple[str, str]:
        """A logged-in portal session for `username` (as after password + TOTP)."""

        def run(session: object) -> tuple[str, str]:
            from sqlalchemy import select
            from sqlalchemy.orm import Session

            assert isinstance(session, Session)
            user = session.scalar(select(User).where(User.username == username))
            assert user is not None
            user.totp_confirmed = True
            token = create_session(session, user_id=user.id, totp_ok=True, ttl=3600)
            row = session.get(PortalSession, session_id(token))
            assert row is not None
            return token, row.csrf_token

        return self.db.run(run)

    def approve(self, url: str) -> None:
        """Click Approve on the approval page (the real portal POST)."""
        reply = httpx.post(
            self.server.rebase(url),
            data={"decision": "approve", "csrf": self.csrf},
            cookies={"rly_session": self.cookie},
            timeout=10,
        )
        assert reply.status_code == 200, reply.text

    def close(self) -> None:
        self.processes.stop_all()
        self.sshds.stop_all()
        self.rlys.stop_all()
        self.db.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    built = Site(tmp_path_factory.mktemp("metrics"))
    try:
        yield built
    finally:
        built.close()


def test_enrollment_and_checkin_move_their_counters(site: Site) -> None:
    """One enrollment and one signed check-in count one each on the tracker's /metrics."""
    moved = Moved(site.server)
    device = OpenSshDevice(site.server, "nas-metrics", "SN-M")
    assert moved.delta("rly_enrollments_total") == 1
    assert moved.delta("rly_checkins_total") == 0

    async def check_in() -> None:
        async with TrackerClient(site.server.base_url, device_id=device.id, key=device.key) as c:
            reply = await c.checkin(
                {
                    "device_id": device.id,
                    "client_version": "openssh",
                    "os_name": "linux",
                    "os_version": "",
                    "uptime": 1.0,
                    "tunnel": {"state": "down", "relay": None, "port": None, "since": None},
                    "wait": 0.0,
                }
            )
            assert reply.status == "accepted"

    asyncio.run(check_in())
    assert moved.delta("rly_checkins_total") == 1


def test_logins_count_by_result(site: Site, technician_factory: TechnicianFactory) -> None:
    """A technician login counts as ok, a wrong gate password as failed."""
    moved = Moved(site.server)
    good = technician_factory(site.server.technician_port, options=SHOW_URL)
    good.expect(URL_RE)
    assert moved.delta('rly_logins_total{port="technician",result="ok"}') == 1
    kbdint_only = {"PreferredAuthentications": "keyboard-interactive"}  # one prompt, one try
    bad = technician_factory(site.server.technician_port, password="wrong", options=kbdint_only)
    bad.expect_eof()
    assert moved.delta('rly_logins_total{port="technician",result="failed"}') == 1
    assert moved.delta('rly_logins_total{port="technician",result="ok"}') == 1


def test_approval_tunnel_and_session_move_their_counters(
    site: Site, technician_factory: TechnicianFactory
) -> None:
    """A tunnel, an approval clicked in the portal and a device session count one each."""
    moved = Moved(site.server)
    device = OpenSshDevice(site.server, "nas-counted", "SN-C")
    device.tunnel = device_tunnel(
        site.processes, site.server, device.id, device.key, site.target.port
    )
    wait_until(lambda: site.db.open_tunnels(device.id), timeout=10)
    tech: Technician = technician_factory(site.server.technician_port, options=SHOW_URL)
    site.approve(tech.expect(URL_RE).group(1))
    tech.expect(re.escape("rly:alice@acme> "))
    assert moved.delta('rly_approvals_total{outcome="approved"}') == 1
    assert moved.delta("rly_tunnels_opened_total") == 1
    assert moved.delta("rly_sessions_total") == 0
    tech.sendline("connect nas-counted")
    tech.sendline("echo in-$((2+3))")
    tech.expect("in-5")
    assert moved.delta("rly_sessions_total") == 1
    tech.sendline("exit")
