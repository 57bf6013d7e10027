"""Hostile device targets behind a tunnel: the relay gives up in bounded time and memory.

One `rly serve` (connect_timeout 3 s) for the module, with a well-behaved
device (a real sshd behind an OpenSSH `-R` tunnel) that a second technician
keeps a shell open on. Each test puts a hostile server (tests.adversarial.hostile)
behind another device's tunnel and has a fresh, approved technician connect to it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.adversarial.hostile import MODES, FloodTarget, HostileTarget
from tests.relay.device_port_support import new_key, wait_until
from tests.relay.test_technician_support import TechDb, approve, device_tunnel
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyServer
from tests.support.sshd import SshdFactory
from tests.support.technician import Technician

CONNECT_TIMEOUT = 3.0
SLACK = 3.0
PROMPT = re.escape("rly:alice@acme> ")
MIB = 1024 * 1024
RSS_GROWTH_LIMIT = 64 * MIB


def rss(pid: int) -> int:
    """Resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Env:
    relay: RlyServer
    db: TechDb
    account: int
    processes: ProcessFactory
    bystander: Technician | None = None  # a second technician in a shell on the good device
    baseline_rss: int = 0
    n: int = 0

    @property
    def relay_pid(self) -> int:
        assert self.relay.process is not None
        return self.relay.process.pid

    def add_device(self, hostname: str, target_port: int) -> str:
        """An accepted device whose OpenSSH `-R` tunnel forwards to `target_port`."""
        key = new_key()
        device_id = self.db.add_named_device(self.account, hostname=hostname, key=key)
        device_tunnel(self.processes, self.relay, device_id, key, target_port)
        wait_until(lambda: self.db.open_tunnels(device_id), timeout=10)
        return device_id

    def technician(self) -> Technician:
        tech = Technician(self.relay.technician_port)
        approve(tech, self.db, "alice")
        return tech

    def bystander_answers(self, within: float = 2.0) -> float:
        """Round-trip a command through the bystander's device shell; return the seconds taken."""
        assert self.bystander is not None
        self.n += 1
        started = time.monotonic()
        self.bystander.sendline(f"echo alive-$(({self.n}*1000+7))")
        self.bystander.expect(f"alive-{self.n * 1000 + 7}", timeout=within)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("hostile")
    relay = RlyServer(
        workdir,
        config={"relay": {"connect_timeout": f"{CONNECT_TIMEOUT:g}s", "approval_ttl": "60s"}},
    )
    processes = ProcessFactory(workdir)
    sshds = SshdFactory(workdir)
    db: TechDb | None = None
    bystander: Technician | None = None
    try:
        relay.start()
        db = TechDb(relay.data_dir)
        account = db.add_account("acme")
        db.add_user("alice", "acme")
        user_ca = (relay.data_dir / "keys" / "user_ca.pub").read_text()
        good = sshds(trusted_user_ca_keys=[user_ca])
        built = Env(relay, db, account, processes)
        built.add_device("good-1", good.port)
        bystander = built.technician()
        bystander.sendline("connect good-1")
        built.bystander = bystander
        built.bystander_answers(within=10)
        built.baseline_rss = rss(built.relay_pid)
        yield built
    finally:
        if bystander is not None:
            bystander.close()
        processes.stop_all()
        sshds.stop_all()
        if db is not None:
            db.close()
        relay.stop()


@pytest.mark.parametrize("mode", MODES)
def test_hostile_target_gives_up_in_bounded_time(env: Env, mode: str) -> None:
    """A hostile banner or packet makes `connect` fail within connect_timeout + 3 s."""
    with HostileTarget(mode) as target:
        hostname = f"evil-{mode.replace('_', '-')}"
        device_id = env.add_device(hostname, target.port)
        tech = env.technician()
        try:
            started = time.monotonic()
            tech.sendline(f"connect {hostname}")
            tech.expect("Giving up. Cannot connect", timeout=CONNECT_TIMEOUT + SLACK)
            tech.expect(PROMPT, timeout=2)
            elapsed = time.monotonic() - started
            assert elapsed <= CONNECT_TIMEOUT + SLACK, elapsed
            assert target.connections >= 1, "the relay never reached the hostile target"
            tech.sendline("whoami")  # the menu still works
            tech.expect("alice", timeout=3)
            # the relay let go of the target's connection (nothing left half-open)
            wait_until(lambda: target.open_connections == 0, timeout=5)
            rows = wait_until(lambda: [r for r in env.db.sessions_of(device_id) if r.ended_at])
            assert rows[0].end_reason == "connect failed", rows[0].end_reason
            env.bystander_answers()
            growth = rss(env.relay_pid) - env.baseline_rss
            assert growth < RSS_GROWTH_LIMIT, f"relay RSS grew by {growth / MIB:.1f} MiB"
        finally:
            tech.close()


def test_flood_at_a_technician_who_does_not_read(env: Env) -> None:
    """100 MB of device output at a technician who does not read keeps relay RSS bounded."""
    with FloodTarget(100 * 1000 * 1000) as target:
        env.add_device("flood-1", target.port)
        tech = env.technician()
        try:
            tech.sendline("connect flood-1")
            # From here on nobody reads ssh's terminal: ssh blocks on its stdout, stops
            # reading its socket, and the relay must stop reading the device in turn.
            deadline = time.monotonic() + 8
            peak = 0
            slowest = 0.0
            while time.monotonic() < deadline:
                peak = max(peak, rss(env.relay_pid))
                slowest = max(slowest, env.bystander_answers(within=3))
                time.sleep(0.5)
            assert target.sessions == 1, "the flood never started"
            growth = peak - env.baseline_rss
            assert growth < RSS_GROWTH_LIMIT, (
                f"relay RSS grew by {growth / MIB:.1f} MiB; target sent {target.sent / MIB:.1f} MiB"
            )
            assert target.sent < 32 * MIB, f"no back-pressure: {target.sent / MIB:.1f} MiB sent"
            assert slowest < 2.0, slowest
        finally:
            tech.close()
        env.bystander_answers()
