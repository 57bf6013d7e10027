"""rly-client's own files, status and logs against a real `rly serve` (tracker + relay).

One server is shared by the module; every test enrolls devices of its own
with the real `rly-client` command and runs them as real processes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import asyncssh
import pytest
from sqlalchemy import select

from core.models import Account, AuditEvent, SshSession, Tunnel
from device_client.config import load_config
from tests.adversarial.loop_server import Listener, LoopServer
from tests.e2e.stack import CLIENT, Stack, wait_for
from tests.relay.device_port_support import host_ca_public, new_key
from tests.relay.test_jump import Transfer
from tests.relay.test_technician_support import TechDb, approve, device_tunnel
from tests.support.procs import ManagedProcess, ProcessFactory
from tests.support.rly_server import RlyFactory
from tests.support.sshd import SshdFactory
from tests.support.technician import TechnicianFactory

pytestmark = pytest.mark.slow
REPAIR = {"connect_timeout": "5s"}  # what a repair may take before it reports failure
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO device_client")


@dataclass
class World:
    stack: Stack
    processes: ProcessFactory
    workdir: Path
    db: TechDb
    clients: list[ManagedProcess] = field(default_factory=list)  # stopped after each test

    def cli(self, *args: str, cwd: Path | None = None) -> ManagedProcess:
        """Run `rly-client ARGS` to completion (60 s at most)."""
        proc = self.processes([*CLIENT, *args], name="rly-client", cwd=cwd or self.workdir)
        proc.wait(60)
        return proc

    def enroll(self, config: str, *extra: str, cwd: Path | None = None) -> ManagedProcess:
        token = self.stack.token(auto_accept=True)
        return self.cli(
            "enroll", "--tracker", self.stack.server.base_url, "--token", token,
            "--config", config, "--target", "builtin", *extra, cwd=cwd,
        )  # fmt: skip

    def run(
        self, config: Path, cwd: Path | None = None, backoff_cap: str | None = "1"
    ) -> ManagedProcess:
        """`rly-client run`; backoff_cap None keeps the real one (returns spread over 40 s)."""
        proc = self.processes(
            [*CLIENT, "run", "--config", str(config)],
            name="rly-client-run",
            env={"RLY_CLIENT_BACKOFF_CAP": backoff_cap} if backoff_cap else {},
            cwd=cwd or self.workdir,
        )
        self.clients.append(proc)
        return proc

    def status(self, config: Path, *extra: str, cwd: Path | None = None) -> ManagedProcess:
        return self.cli("status", "--config", str(config), *extra, cwd=cwd)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One `rly serve` with account acme and portal user alice, for the whole module."""
    workdir = tmp_path_factory.mktemp("client-real")
    servers, processes, sshds = RlyFactory(workdir), ProcessFactory(workdir), SshdFactory(workdir)
    try:
        config = {"relay": {"keepalive_interval": "2s", "keepalive_count": 2, **REPAIR}}
        stack = Stack(servers(config=config), processes, sshds, workdir)
        db = TechDb(stack.server.data_dir)
        try:
            db.add_user("alice", "acme")
            yield World(stack, processes, workdir, db)
        finally:
            db.close()
    finally:
        processes.stop_all()
        servers.stop_all()


@pytest.fixture(autouse=True)
def _stop_clients(world: World) -> Iterator[None]:
    """Each test's `rly-client run` processes end with the test (the server stays)."""
    yield
    while world.clients:
        world.clients.pop().stop()


def _device_id(enroll: ManagedProcess) -> str:
    match = re.search(r"enrolled: device (\S+),", enroll.stdout)
    assert match, enroll.output
    return match.group(1)


def _fresh_dir(world: World, name: str) -> Path:
    path = world.workdir / name
    path.mkdir(mode=0o700)
    return path


def test_two_configs_in_one_directory_keep_their_own_files(world: World) -> None:
    """Two enrollments into one directory get their own key, host key and state; both work."""
    site = _fresh_dir(world, "site")
    first = world.enroll(str(site / "a.toml"))
    assert first.returncode == 0, first.output
    host_key_a = (site / "a.host_key").read_bytes()
    second = world.enroll(str(site / "b.toml"))
    assert second.returncode == 0, second.output
    a, b = load_config(site / "a.toml"), load_config(site / "b.toml")
    assert (a.key_file, a.host_key_file, a.state_file) == (
        site / "a.key", site / "a.host_key", site / "a.state.json",
    )  # fmt: skip
    assert len({a.key_file, b.key_file, a.host_key_file, b.host_key_file}) == 4
    assert a.state_file != b.state_file
    assert (site / "a.host_key").read_bytes() == host_key_a  # the second enroll left it alone
    for config in (site / "a.toml", site / "b.toml"):
        world.run(config)
    for device_id in (_device_id(first), _device_id(second)):
        world.stack.wait_online(device_id)  # a signed check-in, then the key-checked tunnel
        assert world.stack.device_row(device_id).last_checkin_at is not None
    for config in (site / "a.toml", site / "b.toml"):
        remote = world.status(config, "--tracker")
        assert "status:        accepted (tracker, now)" in remote.stdout, remote.output


def test_enrolling_a_config_again_reuses_its_key_or_takes_new_key(world: World) -> None:
    """Enrolling a config again reuses its key (the tracker refuses it) unless --new-key."""
    site = _fresh_dir(world, "again")
    config = site / "client.toml"
    first = world.enroll(str(config))
    assert first.returncode == 0, first.output
    key_before = (site / "client.key").read_bytes()
    again = world.enroll(str(config))
    assert again.returncode == 2
    assert f"using the existing device key {site / 'client.key'}" in again.stdout
    assert again.stderr.count("\n") == 1
    assert f"already enrolled; pass --new-key to replace {site / 'client.key'}" in again.stderr
    assert load_config(config).device_id == _device_id(first)  # nothing was rewritten
    fresh = world.enroll(str(config), "--new-key")
    assert fresh.returncode == 0, fresh.output
    assert (site / "client.key").read_bytes() != key_before
    assert load_config(config).device_id == _device_id(fresh) != _device_id(first)
    world.run(config)
    world.stack.wait_online(_device_id(fresh))


def test_relative_config_path_gives_absolute_paths_for_any_cwd(world: World) -> None:
    """`--config a/b/client.toml` writes absolute paths; run and status work from elsewhere."""
    here, elsewhere = _fresh_dir(world, "here"), _fresh_dir(world, "elsewhere")
    enroll = world.enroll("a/b/client.toml", cwd=here)
    assert enroll.returncode == 0, enroll.output
    config_path = here / "a" / "b" / "client.toml"
    config = load_config(config_path)
    for path in (config.key_file, config.state_file, config.host_key_file):
        assert path is not None and path.is_absolute() and path.parent == config_path.parent
    assert f"config written to {config_path}" in enroll.stdout
    world.run(config_path, cwd=elsewhere)
    world.stack.wait_online(_device_id(enroll))

    def up() -> str | None:
        out = world.status(config_path, cwd=Path("/")).stdout
        return out if "tunnel:        up via" in out else None

    text = wait_for(up, 30, "status to show the tunnel", step=0.3)
    assert f"device:        {_device_id(enroll)}" in text


def test_status_of_a_revoked_device_says_revoked_and_why_the_tunnel_is_down(
    world: World,
) -> None:
    """status prints plain lines: tracker URL, revoked (403) as the status, the tunnel's reason."""
    site = _fresh_dir(world, "revoked")
    enroll = world.enroll(str(site / "client.toml"))
    device_id = _device_id(enroll)
    world.run(site / "client.toml")
    world.stack.wait_online(device_id)
    world.stack.server.run_cli("device", "revoke", device_id, check=True)

    def refused() -> str | None:
        out = world.status(site / "client.toml").stdout
        return out if "status:        revoked" in out else None

    local = wait_for(refused, 30, "the client to learn it was revoked", step=0.3)
    assert f"tracker:       {world.stack.server.base_url}" in local
    assert re.search(r"tunnel:        down: check-in failed: .*device revoked", local), local
    remote = world.status(site / "client.toml", "--tracker")
    assert remote.returncode == 3
    assert "status:        revoked (" in remote.stdout, remote.output
    assert "accepted" not in remote.stdout
    assert "{" not in remote.stdout  # no Python dict


def _first_log_line(world: World, config: Path, journal: bool) -> str:
    """Start `rly-client run` with stderr in a file (named in JOURNAL_STREAM if `journal`)."""
    log_path = world.workdir / f"journal-{journal}-{os.getpid()}.log"
    with log_path.open("wb") as log:
        stat = os.fstat(log.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        if not journal:
            env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino + 1}"  # someone else's stream
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_client.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=log, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        return wait_for(
            lambda: next(iter(log_path.read_text().splitlines()), None), 20, "a log line"
        )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_log_lines_carry_timestamps_unless_stderr_is_the_journal(world: World) -> None:
    """Outside journald each log line starts with a timestamp; on the journal stream it does not."""
    site = _fresh_dir(world, "logs")
    enroll = world.enroll(str(site / "client.toml"))
    assert enroll.returncode == 0, enroll.output
    plain = _first_log_line(world, site / "client.toml", journal=False)
    assert STAMP.match(plain), plain
    journal = _first_log_line(world, site / "client.toml", journal=True)
    assert journal.startswith("INFO device_client.runner: rly-client "), journal


def test_repair_brings_the_tunnel_back_in_a_round_trip_every_time(
    world: World, technician_factory: TechnicianFactory
) -> None:
    """The menu's repair has a new tunnel up within 3 s, 5 times of 5: the reconnect is not lost."""
    site = _fresh_dir(world, "repair")
    device_id = _device_id(world.enroll(str(site / "client.toml")))
    world.run(site / "client.toml", backoff_cap=None)  # a lost request would wait up to 40 s
    tunnel = world.stack.wait_online(device_id)
    tech = technician_factory(world.stack.server.technician_port)
    approve(tech, world.db, "alice")
    for attempt in range(5):
        started = time.monotonic()
        tech.sendline(f"repair {device_id}")
        outcome = tech.expect(r"Repaired: a new tunnel is up\.|Repair failed[^\r\n]*", timeout=10)
        took = time.monotonic() - started
        assert outcome.group(0).startswith("Repaired"), f"attempt {attempt + 1}: {outcome.group(0)}"
        assert took < 3.0, f"attempt {attempt + 1} took {took:.1f}s"
        tunnel = wait_for(partial(_newer_tunnel, world, device_id, tunnel.id), 5, "new tunnel")
    acked = wait_for(lambda: world.stack.device_row(device_id).tunnel_request is None, 5, "ack")
    assert acked  # the device echoed the last reconnect's id, so the tracker cleared it


def _newer_tunnel(world: World, device_id: str, old_id: int) -> Tunnel | None:
    tunnel = world.stack.open_tunnel(device_id)
    return tunnel if tunnel is not None and tunnel.id != old_id else None


def _jump_config(world: World, directory: Path) -> Path:
    """An OpenSSH client config: host `relay` is the technician port; host keys CA-verified."""
    known = directory / "known_hosts"
    known.write_text(f"@cert-authority * {host_ca_public(world.stack.server.data_dir)}\n")
    config = directory / "ssh_config"
    config.write_text(
        f"Host relay\n  HostName 127.0.0.1\n  Port {world.stack.server.technician_port}\n"
        f"  User partner\nHost *\n  UserKnownHostsFile {known}\n"
        "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
        "  PubkeyAuthentication no\n  NumberOfPasswordPrompts 1\n"
    )
    return config


def _scp_both_ways(world: World, device_id: str, directory: Path) -> None:
    """scp (SFTP protocol) a file up to the device and back; both exit 0, the bytes intact."""
    config = _jump_config(world, directory)
    payload = os.urandom(300_000)
    local, remote, back = directory / "up.bin", directory / "on-device.bin", directory / "down.bin"
    local.write_bytes(payload)
    scp = ["/usr/bin/scp", "-F", str(config), "-J", "relay"]
    for source, destination in ((str(local), f"root@{device_id}:{remote}"),
                                (f"root@{device_id}:{remote}", str(back))):  # fmt: skip
        transfer = Transfer([*scp, source, destination])
        transfer.approve(world.db)
        status, out = transfer.finish()
        assert status == 0, out
    assert remote.read_bytes() == payload
    assert back.read_bytes() == payload


def _end_reasons(world: World, device_id: str) -> tuple[list[str | None], list[str]]:
    """The ended sessions' reasons and the session.end audit details, once two have ended."""
    rows = wait_for(lambda: _ended_sessions(world, device_id, 2), 10, "two ended sessions")
    with world.stack.db() as s:
        details = list(
            s.scalars(
                select(AuditEvent.detail).where(
                    AuditEvent.action == "session.end", AuditEvent.target == device_id
                )
            )
        )
    return [row.end_reason for row in rows], details


def _ended_sessions(world: World, device_id: str, count: int) -> list[SshSession] | None:
    with world.stack.db() as s:
        rows = list(
            s.scalars(
                select(SshSession).where(
                    SshSession.device_id == device_id, SshSession.ended_at.is_not(None)
                )
            )
        )
    return rows if len(rows) >= count else None


def test_scp_to_a_builtin_target_exits_0_and_says_so(world: World, tmp_path: Path) -> None:
    """OpenSSH scp -J to a builtin target exits 0 both ways, file intact, sessions end 'exit 0'."""
    site = _fresh_dir(world, "scp")
    device_id = _device_id(world.enroll(str(site / "client.toml")))
    world.run(site / "client.toml")
    world.stack.wait_online(device_id)
    _scp_both_ways(world, device_id, tmp_path)
    reasons, details = _end_reasons(world, device_id)
    assert reasons == ["exit 0", "exit 0"]
    assert len(details) == 2 and all(d.endswith("reason=exit 0") for d in details), details


class _AnyCertificate(asyncssh.SSHServer):
    """Lets the relay's certificate in (this target tests the relay, not its own auth)."""

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return True


class StockSftpTarget(LoopServer):
    """A device target whose sftp subsystem ends with no exit status (stock asyncssh)."""

    def __init__(self) -> None:
        super().__init__("stock-sftp-target")

    async def _listen(self) -> Listener:
        return await asyncssh.listen(
            "127.0.0.1",
            0,
            server_factory=_AnyCertificate,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            sftp_factory=True,
            config=None,
        )


def test_device_closing_a_channel_cleanly_without_exit_status_is_a_clean_end(
    world: World, tmp_path: Path
) -> None:
    """A device ending sftp with EOF and close but no exit status: scp exits 0, reason closed."""
    with world.stack.db() as s:
        account_id = s.scalars(select(Account.id).where(Account.name == "acme")).one()
    key = new_key()
    device_id = world.db.add_named_device(account_id, hostname="stock-sftp", key=key)
    with StockSftpTarget() as target:
        tunnel = device_tunnel(world.processes, world.stack.server, device_id, key, target.port)
        world.clients.append(tunnel)
        world.stack.wait_online(device_id)
        _scp_both_ways(world, device_id, tmp_path)
    reasons, details = _end_reasons(world, device_id)
    assert reasons == ["closed", "closed"]
    assert len(details) == 2 and all(d.endswith("reason=closed") for d in details), details
