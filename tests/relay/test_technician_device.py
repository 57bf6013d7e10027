"""Technician sessions on a device: a real sshd behind an OpenSSH `-R` tunnel, the real client."""

from __future__ import annotations

import json
import re
import stat
import time
from collections.abc import Iterator

import pytest

from core.models import Device
from tests.relay.device_port_support import new_key, wait_until
from tests.relay.test_technician_support import TechDb, approval_token, approve, device_tunnel
from tests.support.procs import ManagedProcess, ProcessFactory
from tests.support.rly_server import RlyFactory, RlyServer
from tests.support.sshd import OpenSshd, SshdFactory
from tests.support.technician import Technician, TechnicianFactory

PROMPT = re.escape("rly:alice@acme> ")


@pytest.fixture
def relay(rly_factory: RlyFactory) -> RlyServer:
    return rly_factory(config={"relay": {"connect_timeout": "3s", "approval_ttl": "30s"}})


@pytest.fixture
def db(relay: RlyServer) -> Iterator[TechDb]:
    handle = TechDb(relay.data_dir)
    try:
        handle.add_account("acme")
        handle.add_user("alice", "acme")
        yield handle
    finally:
        handle.close()


@pytest.fixture
def target(relay: RlyServer, sshd_factory: SshdFactory) -> OpenSshd:
    """A real sshd standing in for the device's own, trusting the relay's user CA."""
    user_ca = (relay.data_dir / "keys" / "user_ca.pub").read_text()
    return sshd_factory(trusted_user_ca_keys=[user_ca])


class Box:
    """A device row with a live tunnel to the target sshd."""

    def __init__(
        self, relay: RlyServer, db: TechDb, target: OpenSshd, processes: ProcessFactory
    ) -> None:
        self.key = new_key()
        self.id = db.add_named_device(1, hostname="box-1", key=self.key)
        self.tunnel: ManagedProcess = device_tunnel(
            processes, relay, self.id, self.key, target.port
        )
        wait_until(lambda: db.open_tunnels(self.id), timeout=10)


@pytest.fixture
def box(relay: RlyServer, db: TechDb, target: OpenSshd, process_factory: ProcessFactory) -> Box:
    return Box(relay, db, target, process_factory)


def _menu(relay: RlyServer, db: TechDb, factory: TechnicianFactory, **kw: object) -> Technician:
    tech = factory(relay.technician_port, **kw)
    approve(tech, db, "alice")
    return tech


def test_connect_to_device_shell_and_back_to_menu(
    relay: RlyServer, db: TechDb, target: OpenSshd, box: Box, technician_factory: TechnicianFactory
) -> None:
    """connect lands in a root shell on the device; `exit` there returns to the menu."""
    tech = _menu(relay, db, technician_factory)
    tech.sendline("connect BOX-1")
    tech.sendline("echo marker-$((6*7)); id -u; echo $TERM")
    tech.expect("marker-42")
    tech.expect(r"\n0\r?\n")
    tech.expect("xterm-256color")
    tech.sendline("exit")
    tech.expect(f"Connection to {box.id}")
    tech.expect(PROMPT)
    rows = wait_until(lambda: [r for r in db.sessions_of(box.id) if r.ended_at])
    assert f"rly:{rows[0].id}:alice" in target.log
    assert rows[0].bytes_up > 0 and rows[0].bytes_down > 0
    assert rows[0].username == "alice" and rows[0].client_ip == "127.0.0.1"
    assert db.device(box.id).target_host_key == target.host_key_public
    assert any(f"session={rows[0].id}" in e.detail for e in db.actions("session.end"))


def test_resize_and_ctrl_c_pass_through(
    relay: RlyServer, db: TechDb, box: Box, technician_factory: TechnicianFactory
) -> None:
    """A window resize reaches the device's PTY, and Ctrl-C interrupts a device command."""
    tech = _menu(relay, db, technician_factory)
    tech.sendline(f"c {box.id}")
    tech.sendline("stty size; echo size-done")
    tech.expect(r"24 80\r?\n")
    tech.resize(30, 100)
    time.sleep(0.3)
    tech.sendline("stty size")
    tech.expect(r"30 100\r?\n")
    tech.sendline("sleep 30; echo not-interrupted")
    time.sleep(0.5)
    started = time.monotonic()
    tech.sendcontrol("c")
    tech.sendline("echo after-$((1+1))")
    tech.expect("after-2", timeout=5)
    assert time.monotonic() - started < 3
    assert "\nnot-interrupted" not in tech.output.replace("\r", "")


def test_exec_connect_passes_exit_status(
    relay: RlyServer, db: TechDb, box: Box, technician_factory: TechnicianFactory
) -> None:
    """`ssh partner@relay connect DEV 'echo ...; exit 7'` runs it on the device and exits 7."""
    tech = technician_factory(
        relay.technician_port, command=["connect", "box-1", "echo from-$((40+2)); exit 7"]
    )
    db.decide(approval_token(tech), "alice")
    tech.expect("from-42", timeout=5)
    assert tech.expect_eof() == 7


def test_exec_connect_with_tty_gives_a_shell(
    relay: RlyServer, db: TechDb, box: Box, technician_factory: TechnicianFactory
) -> None:
    """`ssh -t partner@relay connect DEV` lands in the device shell and exits with its status."""
    tech = technician_factory(relay.technician_port, args=["-t"], command=["connect", box.id])
    db.decide(approval_token(tech), "alice")
    tech.expect("Approved by alice")  # typing before this would go to the approval wait
    tech.sendline("echo tty-$((2*3)); exit 3")
    tech.expect("tty-6", timeout=5)
    assert tech.expect_eof() == 3


def test_close_session_from_another_session(
    relay: RlyServer, db: TechDb, box: Box, technician_factory: TechnicianFactory
) -> None:
    """`show` lists a session and `close SESSION-ID` from another session ends it, naming who."""
    first = _menu(relay, db, technician_factory)
    first.sendline("connect box-1")
    first.sendline("echo in-$((1+2))")
    first.expect("in-3")
    session_id = wait_until(lambda: db.sessions_of(box.id))[0].id
    second = _menu(relay, db, technician_factory)
    second.sendline("show box-1")
    second.expect("Tunnel: relay")
    second.expect(f"Session {session_id}: user alice")
    second.sendline(f"close {session_id}")
    second.expect(f"Asked session {session_id} to close")
    first.expect("closed: closed by alice", timeout=3)
    first.expect(PROMPT)
    row = wait_until(lambda: [r for r in db.sessions_of(box.id) if r.ended_at])[0]
    assert row.end_reason == "closed by alice"


def test_lost_tunnel_returns_to_menu(
    relay: RlyServer, db: TechDb, box: Box, technician_factory: TechnicianFactory
) -> None:
    """When the device's tunnel dies mid-session, the technician is told and back in the menu."""
    tech = _menu(relay, db, technician_factory)
    tech.sendline("connect box-1")
    tech.sendline("echo up-$((2+2))")
    tech.expect("up-4")
    box.tunnel.kill()
    tech.expect("lost", timeout=5)
    tech.expect(PROMPT)


def test_close_device_drops_its_tunnel(
    relay: RlyServer, db: TechDb, box: Box, technician_factory: TechnicianFactory
) -> None:
    """`close DEVICE` closes the device's tunnel connection and audits it."""
    tech = _menu(relay, db, technician_factory)
    tech.sendline("list")
    tech.expect(rf"{box.id}\s+box-1\s+\S+\s+online")
    tech.sendline("close box-1")
    tech.expect(f"Closed the tunnel of device {box.id}")
    wait_until(lambda: not db.open_tunnels(box.id))
    assert db.actions("tunnel.close_requested")


def test_changed_host_key_is_refused(
    relay: RlyServer, db: TechDb, box: Box, technician_factory: TechnicianFactory
) -> None:
    """A target host key other than the pinned one is refused with an alert and audited."""
    other = new_key().export_public_key().decode().strip()

    def pin(session: object) -> None:
        device = session.get(Device, box.id)  # type: ignore[attr-defined]
        device.target_host_key = other

    db.run(pin)
    tech = _menu(relay, db, technician_factory)
    tech.sendline("connect box-1")
    tech.expect("ALERT")
    tech.expect(PROMPT)
    assert db.actions("device.host_key_mismatch")


def test_session_is_recorded_as_asciicast(
    relay: RlyServer, db: TechDb, box: Box, technician_factory: TechnicianFactory
) -> None:
    """Each device session leaves a 0600 asciicast v2 file holding the device's output."""
    tech = _menu(relay, db, technician_factory)
    tech.sendline("connect box-1")
    tech.sendline("echo rec-$((3*3)); exit")
    tech.expect(PROMPT)
    row = wait_until(lambda: [r for r in db.sessions_of(box.id) if r.recording_path])[0]
    assert row.recording_path is not None
    path = relay.data_dir / "recordings" / f"{row.id}.cast"
    assert str(path) == row.recording_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["version"] == 2 and header["width"] == 80
    assert any("rec-9" in json.loads(line)[2] for line in lines[1:])
