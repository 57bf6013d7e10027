"""ProxyJump / scp / sftp to a device through the technician port (SPEC §6.7).

The real OpenSSH client (`ssh -J`, `scp -J`, `sftp -J`) in a PTY; the approval
URL reaches it through keyboard-interactive login and the test approves with
core.approvals.decide. The device is a real sshd trusting the relay's user CA
behind an OpenSSH `-R` tunnel. Both hops verify host keys with an
`@cert-authority` line for the relay's host CA.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pexpect
import pytest

from core.models import SshSession
from tests.relay.device_port_support import host_ca_public, new_key, wait_until, write_key
from tests.relay.test_technician_device import Box
from tests.relay.test_technician_support import URL_RE, TechDb, approval_token
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory, RlyServer
from tests.support.sshd import OpenSshd, SshdFactory
from tests.support.technician import Technician, TechnicianFactory

GATE_PASSWORD = "partner"  # the documented, non-secret gate password
# Drop the helper's defaults that would override the config file (unverified hosts, quiet).
VERIFIED: dict[str, str | None] = {
    "StrictHostKeyChecking": None,
    "UserKnownHostsFile": None,
    "LogLevel": None,
}


@pytest.fixture
def relay(rly_factory: RlyFactory) -> RlyServer:
    return rly_factory(config={"relay": {"connect_timeout": "3s", "approval_ttl": "30s"}})


@pytest.fixture
def db(relay: RlyServer) -> Iterator[TechDb]:
    handle = TechDb(relay.data_dir)
    try:
        handle.add_account("acme")
        handle.add_user("alice", "acme")
        handle.add_account("other")
        handle.add_user("mallory", "other")
        yield handle
    finally:
        handle.close()


@pytest.fixture
def target(relay: RlyServer, sshd_factory: SshdFactory) -> OpenSshd:
    user_ca = (relay.data_dir / "keys" / "user_ca.pub").read_text()
    return sshd_factory(trusted_user_ca_keys=[user_ca])


@pytest.fixture
def box(relay: RlyServer, db: TechDb, target: OpenSshd, process_factory: ProcessFactory) -> Box:
    return Box(relay, db, target, process_factory)


@pytest.fixture
def ssh_config(relay: RlyServer, tmp_path: Path) -> Path:
    """A client config: host alias `relay` for the technician port, CA-verified host keys.

    `-J` hands only `-F` (not `-o`) to the jump process, so both hops are set up here.
    """
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority * {host_ca_public(relay.data_dir)}\n")
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host relay\n"
        "  HostName 127.0.0.1\n"
        f"  Port {relay.technician_port}\n"
        "  User partner\n"
        "Host *\n"
        f"  UserKnownHostsFile {known}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  PubkeyAuthentication no\n"
        "  NumberOfPasswordPrompts 1\n"
        "  LogLevel INFO\n"
    )
    return config


def jump(
    factory: TechnicianFactory, config: Path, device: str, command: Sequence[str] = ()
) -> Technician:
    """`ssh -F config -J relay root@DEVICE [command]`, answering the gate password."""
    return factory(
        22,
        user="root",
        host=device,
        password=GATE_PASSWORD,
        args=["-F", str(config), "-J", "relay"],
        options=VERIFIED,
        command=command,
    )


class Transfer:
    """`scp` or `sftp` in a PTY (the gate password is asked on the terminal)."""

    def __init__(self, argv: list[str]) -> None:
        self.child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=20)
        self.child.expect(r"(?i)password[^\n]*:")
        self.child.sendline(GATE_PASSWORD)

    def approve(self, db: TechDb) -> None:
        self.child.expect(URL_RE)
        match = self.child.match
        assert isinstance(match, re.Match)
        db.decide(match.group(2), "alice")

    def finish(self) -> tuple[int | None, str]:
        self.child.expect(pexpect.EOF, timeout=30)
        self.child.close()
        return self.child.exitstatus, str(self.child.before)


def test_jump_exec_runs_on_the_device(
    relay: RlyServer,
    db: TechDb,
    box: Box,
    target: OpenSshd,
    ssh_config: Path,
    technician_factory: TechnicianFactory,
) -> None:
    """`ssh -J partner@relay root@DEVICE 'id -u'`: the URL comes with the login; prints 0."""
    tech = jump(technician_factory, ssh_config, "box-1", ["id -u; exit 5"])
    token = approval_token(tech)
    tech.expect(r"Verification code: [A-Z2-9]{3}-[A-Z2-9]{3}")
    db.decide(token, "alice")
    tech.expect(r"(?m)^0\r?$", timeout=10)
    assert tech.expect_eof() == 5
    row = wait_until(lambda: [r for r in db.sessions_of(box.id) if r.ended_at])[0]
    assert row.username == "alice" and row.approval_id == db.approval(token).id
    assert row.bytes_down > 0
    assert f"rly:{row.id}:alice" in target.log
    assert any(f"session={row.id}" in e.detail for e in db.actions("session.end"))
    assert len(db.actions("approval.requested")) == 1


def test_jump_interactive_shell_with_pty(
    relay: RlyServer, db: TechDb, box: Box, ssh_config: Path, technician_factory: TechnicianFactory
) -> None:
    """An interactive `ssh -J` session gets a PTY shell on the device with the terminal type."""
    tech = jump(technician_factory, ssh_config, box.id)
    db.decide(approval_token(tech), "alice")
    tech.sendline("echo pty-$((6*7)) $TERM; tty")
    tech.expect("pty-42 xterm-256color", timeout=10)
    tech.expect("/dev/pts/")
    tech.sendline("exit 3")
    assert tech.expect_eof() == 3


def test_scp_both_ways_through_jump(
    relay: RlyServer, db: TechDb, box: Box, ssh_config: Path, tmp_path: Path
) -> None:
    """scp (SFTP protocol, OpenSSH's default) and legacy `scp -O` copy to and from the device."""
    payload = os.urandom(300_000)
    local = tmp_path / "up.bin"
    local.write_bytes(payload)
    remote = tmp_path / "on-device.bin"  # the device sshd runs on this machine
    back = tmp_path / "down.bin"
    for mode in ([], ["-O"]):
        remote.unlink(missing_ok=True)
        back.unlink(missing_ok=True)
        scp = ["/usr/bin/scp", "-F", str(ssh_config), "-J", "relay", *mode]
        up = Transfer([*scp, str(local), f"root@box-1:{remote}"])
        up.approve(db)
        status, out = up.finish()
        assert status == 0, out
        assert remote.read_bytes() == payload
        down = Transfer([*scp, f"root@box-1:{remote}", str(back)])
        down.approve(db)
        status, out = down.finish()
        assert status == 0, out
        assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(payload).digest()

    def ended() -> list[SshSession] | None:
        rows = [r for r in db.sessions_of(box.id) if r.ended_at]
        return rows if len(rows) >= 4 else None

    rows = wait_until(ended)
    assert sum(r.bytes_up for r in rows) >= 2 * len(payload)
    assert not any(r.recording_path for r in rows)  # file transfers are not recorded


def test_sftp_put_and_get_through_jump(
    relay: RlyServer, db: TechDb, box: Box, ssh_config: Path, tmp_path: Path
) -> None:
    """`sftp -J` puts a file on the device and gets it back."""
    local = tmp_path / "put.txt"
    local.write_text("sftp-through-rly\n")
    remote = tmp_path / "device-side.txt"
    got = tmp_path / "got.txt"
    batch = tmp_path / "batch"
    batch.write_text(f"put {local} {remote}\nget {remote} {got}\n")
    sftp = Transfer(
        ["/usr/bin/sftp", "-F", str(ssh_config), "-J", "relay", "-b", str(batch), "root@box-1"]
    )
    sftp.approve(db)
    status, output = sftp.finish()
    assert status == 0, output
    assert remote.read_text() == got.read_text() == "sftp-through-rly\n"


def test_rejected_jump_disconnects_at_once(
    relay: RlyServer, db: TechDb, box: Box, ssh_config: Path, technician_factory: TechnicianFactory
) -> None:
    """Rejecting the approval ends the -J attempt within a second, with no second prompt."""
    tech = jump(technician_factory, ssh_config, "box-1", ["id -u"])
    token = approval_token(tech)
    started = time.monotonic()
    db.decide(token, "alice", approve=False)
    status = tech.expect_eof(timeout=3)
    assert time.monotonic() - started < 1.0
    assert status not in (0, None)
    assert "rejected" in tech.output
    assert tech.output.lower().count("password") == 1
    assert not db.sessions_of(box.id)


def test_jump_to_another_accounts_device_is_refused(
    relay: RlyServer, db: TechDb, box: Box, ssh_config: Path, technician_factory: TechnicianFactory
) -> None:
    """Approved by mallory (account other), box-1 of acme is not found; refused and audited."""
    tech = jump(technician_factory, ssh_config, box.id, ["id -u"])
    db.decide(approval_token(tech), "mallory")
    tech.expect("Could not find matching clients")
    assert tech.expect_eof() not in (0, None)
    refused = wait_until(lambda: db.actions("technician.refused_request"))
    assert any(f"direct-tcpip to {box.id}:22" in e.detail for e in refused)
    assert not db.sessions_of(box.id)


@pytest.mark.parametrize("destination", ["box-1:2222", "example.org:22", "127.0.0.1:22"])
def test_jump_to_other_ports_and_hosts_is_refused(
    relay: RlyServer,
    db: TechDb,
    box: Box,
    ssh_config: Path,
    technician_factory: TechnicianFactory,
    destination: str,
) -> None:
    """Only port 22 of a device of the approver's account: anything else is refused."""
    host, port = destination.split(":")
    tech = technician_factory(
        int(port),
        user="root",
        host=host,
        args=["-F", str(ssh_config), "-J", "relay"],
        options=VERIFIED,
        command=["true"],
    )
    if port == "22":  # a name can only be checked against the approver's account
        db.decide(approval_token(tech), "alice")
    tech.expect("open failed")
    assert tech.expect_eof() not in (0, None)
    wait_until(
        lambda: any(
            f"direct-tcpip to {host}:{port}" in e.detail
            for e in db.actions("technician.refused_request")
        )
    )
    assert not db.sessions_of(box.id)


def test_kbdint_login_shows_url_before_the_menu_without_second_approval(
    relay: RlyServer, db: TechDb, technician_factory: TechnicianFactory
) -> None:
    """`ssh partner@relay`: the URL is shown during login, once; after approval, the menu."""
    tech = technician_factory(relay.technician_port, options={"LogLevel": "INFO"})
    tech.expect("This connection needs approval")
    token = approval_token(tech)
    tech.expect("The request expires in")
    tech.expect("Waiting for approval of the link shown at login")  # not the block again
    db.decide(token, "alice")
    tech.expect(re.escape("rly:alice@acme> "), timeout=3)
    assert len(re.findall(URL_RE, tech.output)) == 1
    assert len(db.actions("approval.requested")) == 1


def test_key_login_jump_is_refused_with_a_reason(
    relay: RlyServer,
    db: TechDb,
    box: Box,
    ssh_config: Path,
    tmp_path: Path,
    technician_factory: TechnicianFactory,
) -> None:
    """A key login shows no URL before its session, so its -J is refused, audited, not held."""
    key = new_key()
    db.add_user_key("alice", key)
    key_path = write_key(key, tmp_path / "alice_id")
    config = tmp_path / "key_config"
    config.write_text(
        ssh_config.read_text().replace(
            "  User partner\n",
            f"  User alice\n  PubkeyAuthentication yes\n  IdentityFile {key_path}\n"
            "  IdentitiesOnly yes\n",
        )
    )
    tech = technician_factory(
        22,
        user="root",
        host="box-1",
        password=None,
        args=["-F", str(config), "-J", "relay"],
        options=VERIFIED,
        command=["true"],
    )
    tech.expect("has no approval")
    assert tech.expect_eof() not in (0, None)
    assert not db.actions("approval.requested")
    refused = wait_until(lambda: db.actions("technician.refused_request"))
    assert any("direct-tcpip to box-1:22: this login has no approval" in e.detail for e in refused)


def test_client_leaving_a_held_jump_abandons_the_approval(
    relay: RlyServer, db: TechDb, box: Box, ssh_config: Path, technician_factory: TechnicianFactory
) -> None:
    """Closing the -J client while its channel waits for approval marks the request abandoned."""
    tech = jump(technician_factory, ssh_config, "box-1", ["true"])
    token = approval_token(tech)
    tech.close()
    wait_until(lambda: db.approval(token).status == "abandoned")
