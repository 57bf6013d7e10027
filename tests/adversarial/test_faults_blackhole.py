"""A real rly-client whose network path to the relay turns into a blackhole."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.adversarial.proxy import TcpProxy
from tests.e2e.stack import Stack
from tests.relay.test_technician_support import TechDb, approve
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory
from tests.support.sshd import SshdFactory
from tests.support.technician import TechnicianFactory

KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 1.0, 2
CONNECT_TIMEOUT = 3.0


def test_blackholed_device_goes_offline_and_connect_gives_up(
    rly_factory: RlyFactory,
    process_factory: ProcessFactory,
    sshd_factory: SshdFactory,
    technician_factory: TechnicianFactory,
    tmp_path: Path,
) -> None:
    """A blackholed tunnel is closed within interval x count + 2 s, then `connect` gives up."""
    server = rly_factory(
        config={
            "relay": {
                "keepalive_interval": f"{KEEPALIVE_INTERVAL:g}s",
                "keepalive_count": KEEPALIVE_COUNT,
                "connect_timeout": f"{CONNECT_TIMEOUT:g}s",
                "approval_ttl": "60s",
            },
            # a short long-poll so that stopping rly serve at teardown is quick
            "tracker": {"checkin_wait": "2s"},
        }
    )
    stack = Stack(server, process_factory, sshd_factory, tmp_path)
    db = TechDb(server.data_dir)
    with TcpProxy(server.device_port) as proxy:
        try:
            db.add_user("alice", "acme")
            device = stack.enroll_device(hostname="nas-bh")
            device.edit_config(relay_ports=[proxy.port])
            device.start()
            tunnel = stack.wait_online(device.id)
            assert proxy.connections >= 1  # the tunnel runs through the proxy

            proxy.blackhole()
            started = time.monotonic()
            stack.wait_offline(device.id, timeout=KEEPALIVE_INTERVAL * KEEPALIVE_COUNT + 5)
            took = time.monotonic() - started
            assert took <= KEEPALIVE_INTERVAL * KEEPALIVE_COUNT + 2, took
            closed = [t for t in db.tunnels(device.id) if t.id == tunnel.id]
            assert closed[0].close_reason == "keepalive timeout", closed[0].close_reason

            tech = technician_factory(server.technician_port)
            approve(tech, db, "alice")
            started = time.monotonic()
            tech.sendline("connect nas-bh")
            tech.expect(re.escape("Waiting for connection..."), timeout=3)
            tech.expect(re.escape("Giving up. Cannot connect"), timeout=CONNECT_TIMEOUT + 3)
            tech.expect(re.escape("rly:alice@acme> "), timeout=2)
            assert time.monotonic() - started <= CONNECT_TIMEOUT + 3
            assert stack.open_tunnel(device.id) is None
        finally:
            db.close()
