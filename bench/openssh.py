"""The plain OpenSSH side of the bench: client key and config, sshds, tunnels, ControlMasters.

Every path ends in the same device sshd, so only the hops in between differ.
All hops are pinned to one cipher (client config and sshd_config), because
cipher choice alone moves bulk throughput by 2x. The client config is passed
with `-F`, which OpenSSH hands on to the `ssh -W` it spawns for `-J`, so the
jump hop gets the same settings.

Throughput and keystroke runs use one ControlMaster per path (`-S`): login
and, for rly, the approval happen once, and every run is a new session on
the same connection. OpenSSH passes the session's stdin/stdout descriptors
to the master, so multiplexing adds no copy to the data path.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from bench.common import Unavailable
from bench.cpu import Sides
from bench.stream import Approve
from tests.support.ports import free_port, port_accepts
from tests.support.procs import ManagedProcess
from tests.support.sshd import OpenSshd

SSH = "/usr/bin/ssh"
CIPHER = "aes128-gcm@openssh.com"
DEVICE_USER = "root"
SSHD_OPTIONS = {"Ciphers": CIPHER, "MaxSessions": "64", "AllowTcpForwarding": "yes"}


@dataclass(frozen=True)
class SshPath:
    """One way of running a command on the device sshd with the OpenSSH client.

    `options` go before the destination, `dest` is the destination and for rly
    also `connect DEVICE`; the remote command is appended as one argument.
    `approve` answers an approval URL printed by a session (rly only); `sides`
    names the relay-side and device-side processes whose CPU the legs read.
    """

    name: str
    options: tuple[str, ...]
    dest: tuple[str, ...]
    hops: tuple[str, ...]
    control: Path | None = None
    approve: Approve | None = None
    sides: Sides = field(default_factory=Sides)  # relay and device processes (CPU)

    def command(self, remote: str, *, tty: bool = False, mux: bool = True) -> list[str]:
        """The argv running `remote`; `tty` asks for a remote PTY (-tt), `mux` uses the master."""
        argv = [SSH, *self.options, "-tt" if tty else "-T"]
        if mux and self.control is not None:
            argv += ["-S", str(self.control), "-o", "ControlMaster=no"]
        return [*argv, *self.dest, remote]


class ClientKey:
    """An ed25519 key for the bench's OpenSSH clients and the ssh_config that uses it."""

    def __init__(self, directory: Path) -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        self.path = directory / "id_ed25519"
        key.write_private_key(self.path)
        self.path.chmod(0o600)
        self.public: str = key.export_public_key().decode().strip()
        self.config = directory / "ssh_config"
        self.config.write_text(
            "Host *\n"
            f"  IdentityFile {self.path}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
            "  BatchMode yes\n"
            f"  Ciphers {CIPHER}\n"
            "  Compression no\n"
            "  EscapeChar none\n"
            "  ServerAliveInterval 0\n"
            "  ControlMaster no\n"
        )


def start_sshd(work: Path, stack: ExitStack, key: ClientKey, ca_keys: Sequence[str]) -> OpenSshd:
    """A loopback sshd with the bench key authorized and the CAs trusted, stopped with `stack`."""
    sshd = OpenSshd(
        work, authorized_keys=[key.public], trusted_user_ca_keys=ca_keys, options=SSHD_OPTIONS
    )
    stack.callback(sshd.stop)
    return sshd.start()


def start_reverse_tunnel(
    work: Path, stack: ExitStack, key: ClientKey, jump: OpenSshd, device: OpenSshd
) -> tuple[int, int]:
    """The device runs `ssh -N -R` to the jump sshd; return the tunnel's port on the jump
    host and the device-side `ssh` process id."""
    for _ in range(5):
        port = free_port()
        argv = [SSH, "-F", str(key.config), "-N", "-o", "ExitOnForwardFailure=yes"]
        argv += ["-R", f"127.0.0.1:{port}:127.0.0.1:{device.port}"]
        argv += ["-p", str(jump.port), f"{DEVICE_USER}@127.0.0.1"]
        proc = ManagedProcess(argv, workdir=work, name="ssh-R").start()
        stack.callback(proc.stop)
        deadline = time.monotonic() + 10
        while proc.running and time.monotonic() < deadline:
            if port_accepts("127.0.0.1", port):
                return port, proc.pid
            time.sleep(0.05)
        proc.stop()
    raise Unavailable("ssh -R tunnel did not come up")


def start_master(work: Path, stack: ExitStack, path: SshPath) -> SshPath:
    """Start a ControlMaster (`ssh -M -N`) for `path` and return the path using it."""
    control = work / f"mux-{path.name}"
    argv = [SSH, *path.options, "-M", "-N", "-S", str(control), *path.dest]
    proc = ManagedProcess(argv, workdir=work, name=f"master-{path.name}").start()
    stack.callback(proc.stop)
    wait_for_master(control, path.options, path.dest[0], proc)
    return dataclasses.replace(path, control=control)


def wait_for_master(
    control: Path,
    options: Sequence[str],
    dest: str,
    proc: ManagedProcess | None = None,
    timeout: float = 15.0,
) -> None:
    """Wait until `ssh -O check` succeeds on `control`; raise Unavailable if it does not."""
    deadline = time.monotonic() + timeout
    check = [SSH, *options, "-S", str(control), "-O", "check", dest]
    while time.monotonic() < deadline:
        if subprocess.run(check, capture_output=True, check=False).returncode == 0:
            return
        if proc is not None and not proc.running:
            raise Unavailable(f"ControlMaster exited: {proc.stderr.strip()[-200:]}")
        time.sleep(0.05)
    raise Unavailable(f"ControlMaster {control.name} not ready within {timeout:g}s")


def baseline_paths(
    key: ClientKey, device: OpenSshd, jump: OpenSshd, tunnel: tuple[int, int]
) -> dict[str, SshPath]:
    """The three OpenSSH baselines of the issue, not yet multiplexed.

    Relay side: the jump sshd and its per-connection children; device side of
    the reverse path: the device's `ssh -R`.
    """
    tunnel_port, tunnel_pid = tunnel
    assert jump.process is not None
    jump_side = (jump.process.pid,)
    base = ("-F", str(key.config))
    dest = (f"{DEVICE_USER}@127.0.0.1",)
    via_jump = ("-J", f"{DEVICE_USER}@127.0.0.1:{jump.port}")
    hop = f"OpenSSH {CIPHER}"
    return {
        "direct": SshPath("direct", (*base, "-p", str(device.port)), dest, (f"ssh→sshd: {hop}",)),
        "proxyjump": SshPath(
            "proxyjump",
            (*base, *via_jump, "-p", str(device.port)),
            dest,
            (f"ssh→jump sshd: {hop}", f"ssh→device sshd (inside): {hop}"),
            sides=Sides(relay=jump_side),
        ),
        "reverse": SshPath(
            "reverse",
            (*base, *via_jump, "-p", str(tunnel_port)),
            dest,
            (
                f"ssh→jump sshd: {hop}",
                f"device ssh -R→jump sshd: {hop}",
                f"ssh→device sshd (inside both): {hop}",
            ),
            sides=Sides(relay=jump_side, device=(tunnel_pid,)),
        ),
    }
