"""The README's plain-OpenSSH device, end to end, and what the menu shows of devices.

The device is enrolled through the tracker API exactly as the README does it
(curl's JSON, an auto-accept token) and holds its tunnel with OpenSSH
`ssh -N -R 0:...` to the relay's device port; it never checks in. Its target
is a real sshd trusting the relay's user CA. The technician is the real
OpenSSH client: the menu's `connect` and `ssh -J` must both reach root there.
One relay, target and device serve the whole module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.relay.device_port_support import host_ca_public, new_key, wait_until
from tests.relay.test_technician_support import TechDb, approval_token, approve, device_tunnel
from tests.support.procs import ManagedProcess, ProcessFactory
from tests.support.rly_server import RlyFactory, RlyServer
from tests.support.sshd import OpenSshd, SshdFactory
from tests.support.technician import Technician, TechnicianFactory

PROMPT = re.escape("rly:alice@acme> ")
GATE_PASSWORD = "partner"  # the documented, non-secret gate password


class OpenSshDevice:
    """A device enrolled with the README's curl body, holding `ssh -N -R` when started."""

    def __init__(self, relay: RlyServer, hostname: str, serial: str) -> None:
        self.relay = relay
        self.key = new_key()
        created = relay.run_cli(
            "enroll-token", "create", "--account", "acme", "--auto-accept", check=True
        )
        token = re.search(r"^token (\S+)$", created.stdout, re.M)
        assert token, created.stdout
        body = {
            "token": token.group(1),
            "hostname": hostname,
            "serial": serial,
            "os_name": "linux",
            "os_version": "",
            "client_version": "openssh",
            "public_key": self.key.export_public_key().decode().strip(),
        }
        reply = httpx.post(f"{relay.base_url}/api/v1/enroll", json=body, timeout=10)
        assert reply.status_code == 200, reply.text
        self.id: str = reply.json()["device_id"]
        self.tunnel: ManagedProcess | None = None

    def hold_tunnel(self, processes: ProcessFactory, target: OpenSshd, db: TechDb) -> None:
        self.tunnel = device_tunnel(processes, self.relay, self.id, self.key, target.port)
        wait_until(lambda: db.open_tunnels(self.id), timeout=10)


class Site:
    """The module's relay, database handle, target sshd and its OpenSSH device."""

    def __init__(self, workdir: Path) -> None:
        self.rlys = RlyFactory(workdir)
        self.sshds = SshdFactory(workdir)
        self.processes = ProcessFactory(workdir)
        self.relay = self.rlys(config={"relay": {"connect_timeout": "2s"}})
        self.db = TechDb(self.relay.data_dir)
        self.db.add_account("acme")
        self.db.add_user("alice", "acme")
        user_ca = (self.relay.data_dir / "keys" / "user_ca.pub").read_text()
        self.target = self.sshds(trusted_user_ca_keys=[user_ca])
        self.device = OpenSshDevice(self.relay, "nas-2", "SN2")
        self.device.hold_tunnel(self.processes, self.target, self.db)
        self.ssh_config = self._ssh_config(workdir)

    def _ssh_config(self, workdir: Path) -> Path:
        """Host alias `relay` for the technician port; both hops verified by the host CA."""
        known = workdir / "known_hosts"
        known.write_text(f"@cert-authority * {host_ca_public(self.relay.data_dir)}\n")
        config = workdir / "ssh_config"
        config.write_text(
            f"Host relay\n  HostName 127.0.0.1\n  Port {self.relay.technician_port}\n"
            f"  User partner\nHost *\n  UserKnownHostsFile {known}\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
            "  PubkeyAuthentication no\n  NumberOfPasswordPrompts 1\n  LogLevel INFO\n"
        )
        return config

    def close(self) -> None:
        self.processes.stop_all()
        self.sshds.stop_all()
        self.rlys.stop_all()
        self.db.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    built = Site(tmp_path_factory.mktemp("openssh-device"))
    try:
        yield built
    finally:
        built.close()


def menu(site: Site, factory: TechnicianFactory) -> Technician:
    tech = factory(site.relay.technician_port, options={"LogLevel": "INFO"})  # shows the URL
    approve(tech, site.db, "alice")
    return tech


def jump(site: Site, factory: TechnicianFactory, device: str, command: list[str]) -> Technician:
    """`ssh -F config -J relay root@DEVICE command`, answering the gate password."""
    no_overrides: dict[str, str | None] = {
        "StrictHostKeyChecking": None,
        "UserKnownHostsFile": None,
        "LogLevel": None,
    }
    return factory(
        22,
        user="root",
        host=device,
        password=GATE_PASSWORD,
        args=["-F", str(site.ssh_config), "-J", "relay"],
        options=no_overrides,
        command=command,
    )


def test_the_device_never_checks_in_yet_is_online(site: Site) -> None:
    """The `ssh -R` device has no check-in at all, and its tunnel is up (the premise here)."""
    assert site.db.device(site.device.id).last_checkin_at is None
    assert site.db.open_tunnels(site.device.id)


def test_menu_connect_reaches_a_root_shell(
    site: Site, technician_factory: TechnicianFactory
) -> None:
    """`connect` by hostname lands in a root shell on the plain-OpenSSH device's sshd."""
    tech = menu(site, technician_factory)
    tech.sendline("list nas-2")
    tech.expect(rf"{site.device.id}\s+nas-2\s+SN2\s+online\s+never")
    tech.sendline("connect nas-2")
    tech.sendline("echo uid-$(id -u)-$((6*7))")
    tech.expect("uid-0-42")
    tech.sendline("exit")
    tech.expect(f"Connection to {site.device.id} \\(nas-2\\) closed: exit 0")
    tech.expect(PROMPT)
    assert "Client not found" not in tech.output


def test_proxyjump_runs_a_command_as_root(
    site: Site, technician_factory: TechnicianFactory
) -> None:
    """`ssh -J partner@relay root@nas-2 id -u` runs on the device as root and exits 0."""
    tech = jump(site, technician_factory, "nas-2", ["echo", "jumped-as-$(id -u)"])
    site.db.decide(approval_token(tech), "alice")
    tech.expect("jumped-as-0", timeout=10)
    assert tech.expect_eof() == 0


def test_a_device_with_neither_check_in_nor_tunnel_is_not_found(
    site: Site, technician_factory: TechnicianFactory
) -> None:
    """Enrolled, never checked in, no tunnel: the seed's 'Client not found...' in menu and jump."""
    quiet = OpenSshDevice(site.relay, "nas-quiet", "SN-QUIET")
    tech = menu(site, technician_factory)
    tech.sendline("connect nas-quiet")
    tech.expect("Client not found. It may not be checking in")
    tech.expect("holds no tunnel")
    tech.expect(PROMPT)
    assert "Waiting for connection" not in tech.output
    jumped = jump(site, technician_factory, quiet.id, ["true"])
    site.db.decide(approval_token(jumped), "alice")
    jumped.expect("Client not found. It may not be checking in")
    assert jumped.expect_eof() != 0


def test_show_reads_live_byte_counts(site: Site, technician_factory: TechnicianFactory) -> None:
    """`show` from another session sees a session's bytes within seconds, not after 30 s."""
    first = menu(site, technician_factory)
    first.sendline("connect nas-2")
    first.sendline("seq 1 3000 | tail -n 1; echo pushed-$((1+1))")
    first.expect("pushed-2")
    started = time.monotonic()
    session_id = wait_until(
        lambda: [r for r in site.db.sessions_of(site.device.id) if r.ended_at is None]
    )[0].id
    second = menu(site, technician_factory)
    second.sendline("show nas-2")
    shown = second.expect(rf"Session {session_id}: .* bytes up (\d+) down (\d+), idle")
    assert time.monotonic() - started < 10
    assert int(shown.group(1)) > 0 and int(shown.group(2)) > 0
    row = next(r for r in site.db.sessions_of(site.device.id) if r.id == session_id)
    assert row.bytes_up == row.bytes_down == 0  # the row itself is not written yet
    first.sendline("exit")
    first.expect(PROMPT)


def test_list_shows_whole_serials_and_one_line_past_the_end(
    site: Site, technician_factory: TechnicianFactory
) -> None:
    """Serials and hostnames are shown whole (usable with connect); past the end is one line."""
    serial = "SERIAL-0123456789-ABCDEFGHIJ-long"
    hostname = "a-hostname-longer-than-twenty-four-characters"
    device_id = site.db.add_named_device(1, hostname=hostname, serial=serial)
    tech = menu(site, technician_factory)
    tech.sendline("list longer-than")
    tech.expect(rf"{device_id}\s+{hostname}\s+{serial}\s+offline")
    tech.expect(r"Page 1 of 1 \(1 devices\)\.")
    tech.sendline(f"show {serial}")
    tech.expect(f"Device {device_id} \\({hostname}, serial {serial}\\)")
    tech.expect(PROMPT)
    before = len(tech.output)
    tech.sendline("list longer-than --page 2")
    tech.expect(PROMPT)
    answer = [line.strip() for line in tech.output[before:].splitlines()[1:-1] if line.strip()]
    assert answer == ["There is no page 2; 1 page(s) of 1 devices."]


def test_an_ambiguous_name_lists_the_candidates(
    site: Site, technician_factory: TechnicianFactory
) -> None:
    """A hostname two devices share: the menu says it is ambiguous and lists both ids."""
    first = site.db.add_named_device(1, hostname="twin-box")
    second = site.db.add_named_device(1, hostname="TWIN-BOX")
    tech = menu(site, technician_factory)
    tech.sendline("connect twin-box")
    tech.expect("Several clients match that name")
    tech.expect("'twin-box' is the hostname or serial of 2 devices; connect by id:")
    for device_id in sorted([first, second]):
        tech.expect(rf"(?i){device_id}\s+twin-box")
    assert "Could not find matching clients" not in tech.output
