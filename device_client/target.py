"""The builtin target: an SSH server for appliances that have no sshd.

It is reachable only through the tunnel and accepts only user certificates
from the relay's user CA carrying the login principal, then runs a real login
shell on a pty (a pipe would lose job control, window sizes and Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pty
import pwd
import signal
import socket
import struct
import termios
from asyncio.subprocess import PIPE
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh

from core.data_wire import CONTROL_HOST
from core.ssh_algorithms import ENCRYPTION_ALGS, KEX_ALGS, MAC_ALGS
from device_client.config import ClientConfig
from device_client.tunnel import Activity

if TYPE_CHECKING:
    from device_client.data_sessions import DataDialer

log = logging.getLogger(__name__)

LOGIN_TIMEOUT = 30.0
DRAIN_GRACE = 0.5  # background jobs may keep the pty open after the shell exits
HANGUP_GRACE = 3.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# SSH pty mode opcodes (RFC 4254 §8) -> termios names; missing names are skipped.
_CC_MODES = {
    1: "VINTR",
    2: "VQUIT",
    3: "VERASE",
    4: "VKILL",
    5: "VEOF",
    6: "VEOL",
    7: "VEOL2",
    8: "VSTART",
    9: "VSTOP",
    10: "VSUSP",
    12: "VREPRINT",
    13: "VWERASE",
    14: "VLNEXT",
    18: "VDISCARD",
}
_FLAG_MODES = {
    0: {
        30: "IGNPAR",
        31: "PARMRK",
        32: "INPCK",
        33: "ISTRIP",
        34: "INLCR",
        35: "IGNCR",
        36: "ICRNL",
        37: "IUCLC",
        38: "IXON",
        39: "IXANY",
        40: "IXOFF",
        41: "IMAXBEL",
        42: "IUTF8",
    },
    1: {70: "OPOST", 71: "OLCUC", 72: "ONLCR", 73: "OCRNL", 74: "ONOCR", 75: "ONLRET"},
    3: {
        50: "ISIG",
        51: "ICANON",
        52: "XCASE",
        53: "ECHO",
        54: "ECHOE",
        55: "ECHOK",
        56: "ECHONL",
        57: "NOFLSH",
        58: "TOSTOP",
        59: "IEXTEN",
        60: "ECHOCTL",
        61: "ECHOKE",
        62: "PENDIN",
    },
}


def _apply_modes(fd: int, modes: Mapping[int, int]) -> None:
    """Apply the client's terminal modes so Ctrl-C, erase etc. behave as it expects."""
    attrs: list[Any] = termios.tcgetattr(fd)
    for opcode, value in modes.items():
        if (name := _CC_MODES.get(opcode)) and hasattr(termios, name):
            attrs[6][getattr(termios, name)] = bytes([0 if value == 255 else value & 0xFF])
        for index, table in _FLAG_MODES.items():
            if (name := table.get(opcode)) and hasattr(termios, name):
                bit = getattr(termios, name)
                attrs[index] = attrs[index] | bit if value else attrs[index] & ~bit
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _set_size(fd: int, width: int, height: int, pixwidth: int, pixheight: int) -> None:
    """Set the pty window size; the kernel sends SIGWINCH to the foreground job."""
    if width and height:
        packed = struct.pack("HHHH", height, width, pixwidth, pixheight)
        fcntl.ioctl(fd, termios.TIOCSWINSZ, packed)


def _take_controlling_tty() -> None:
    """Runs in the child after setsid: make the pty on fd 0 its controlling tty.

    Only one ioctl, so the usual preexec_fn caveats about threads do not bite.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _send_signal(proc: asyncio.subprocess.Process, name: str, tty: int | None) -> None:
    """Deliver an SSH signal to the foreground job (pty) or the session's group."""
    number = getattr(signal, f"SIG{name}", None)
    if not isinstance(number, signal.Signals):
        return
    try:
        group = os.tcgetpgrp(tty) if tty is not None else proc.pid
        os.killpg(group, number)
    except OSError:
        pass


def _child_env(account: pwd.struct_passwd, term_type: str | None) -> dict[str, str]:
    env = {
        "HOME": account.pw_dir,
        "USER": account.pw_name,
        "LOGNAME": account.pw_name,
        "SHELL": account.pw_shell or "/bin/sh",
        "PATH": DEFAULT_PATH,
    }
    if term_type:
        env["TERM"] = term_type
    if lang := os.environ.get("LANG"):
        env["LANG"] = lang
    return env


def _child_ids(account: pwd.struct_passwd) -> dict[str, Any]:
    """Switch to the login user when running as root (no-op for root itself)."""
    if os.geteuid() != 0 or account.pw_uid == 0:
        return {}
    return {
        "user": account.pw_uid,
        "group": account.pw_gid,
        "extra_groups": os.getgrouplist(account.pw_name, account.pw_gid),
    }


async def _wait_fd(fd: int, *, writable: bool = False) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    add, remove = (
        (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    )

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


async def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _wait_fd(fd, writable=True)


async def _pty_output(fd: int, stdout: asyncssh.SSHWriter[bytes]) -> None:
    """Copy the pty to the channel until every holder of the pty side closed it."""
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            await _wait_fd(fd)
            continue
        except OSError:  # EIO: the last process holding the pty is gone
            return
        if not data:
            return
        stdout.write(data)
        await stdout.drain()


async def _stream_output(src: asyncio.StreamReader | None, dst: asyncssh.SSHWriter[bytes]) -> None:
    while src is not None and (data := await src.read(65536)):
        dst.write(data)
        await dst.drain()


async def _input(
    process: asyncssh.SSHServerProcess[bytes], proc: asyncio.subprocess.Process, tty: int | None
) -> None:
    """Feed channel input to the child, turning resizes and signals into tty actions."""
    while True:
        try:
            data = await process.stdin.read(65536)
        except asyncssh.TerminalSizeChanged as exc:
            if tty is not None:
                _set_size(tty, exc.width, exc.height, exc.pixwidth, exc.pixheight)
            continue
        except asyncssh.SignalReceived as exc:
            _send_signal(proc, exc.signal, tty)
            continue
        except asyncssh.BreakReceived:
            _send_signal(proc, "INT", tty)
            continue
        if not data:
            break
        if tty is not None:
            await _write_fd(tty, data)
        elif proc.stdin is not None:
            proc.stdin.write(data)
            await proc.stdin.drain()
    if tty is None and proc.stdin is not None:
        proc.stdin.close()


async def _quietly(coro: Awaitable[None]) -> None:
    """Run a copy loop; the channel or child going away mid-copy is a normal end."""
    with contextlib.suppress(OSError, asyncssh.Error):
        await coro


async def _spawn(
    process: asyncssh.SSHServerProcess[bytes], account: pwd.struct_passwd, slave: int | None
) -> asyncio.subprocess.Process:
    shell = account.pw_shell or "/bin/sh"
    command = process.command
    argv = [shell, "-c", command] if command else [f"-{os.path.basename(shell)}"]
    stdio: dict[str, Any] = (
        {"stdin": slave, "stdout": slave, "stderr": slave, "preexec_fn": _take_controlling_tty}
        if slave is not None
        else {"stdin": PIPE, "stdout": PIPE, "stderr": PIPE}
    )
    cwd = account.pw_dir if Path(account.pw_dir).is_dir() else "/"  # noqa: ASYNC240 (one stat)
    return await asyncio.create_subprocess_exec(
        argv[0],
        *argv[1:],
        executable=shell,
        env=_child_env(account, process.term_type),
        cwd=cwd,
        start_new_session=True,
        **stdio,
        **_child_ids(account),
    )


def _report_exit(process: asyncssh.SSHServerProcess[bytes], returncode: int) -> None:
    if process.is_closing():
        return
    if returncode < 0:
        process.exit_with_signal(signal.Signals(-returncode).name.removeprefix("SIG"))
    else:
        process.exit(returncode)


async def _finish(
    proc: asyncio.subprocess.Process,
    outputs: list[asyncio.Task[None]],
    process: asyncssh.SSHServerProcess[bytes],
) -> int:
    """Wait for the child or a hang-up; on hang-up end the child like sshd does."""
    child = asyncio.ensure_future(proc.wait())
    closed = asyncio.ensure_future(process.wait_closed())
    await asyncio.wait({child, closed}, return_when=asyncio.FIRST_COMPLETED)
    if not child.done():
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGHUP)
        try:
            await asyncio.wait_for(asyncio.shield(child), HANGUP_GRACE)
        except TimeoutError:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
    returncode = await child
    closed.cancel()
    await asyncio.wait(outputs, timeout=DRAIN_GRACE)
    return returncode


async def run_session(
    process: asyncssh.SSHServerProcess[bytes], account: pwd.struct_passwd
) -> None:
    """Run a login shell or command for one channel and report its exit status."""
    master = slave = None
    if process.term_type:
        master, slave = pty.openpty()
        _apply_modes(slave, process.term_modes)
        _set_size(slave, *process.term_size)
        os.set_blocking(master, False)
    try:
        proc = await _spawn(process, account, slave)
    finally:
        if slave is not None:
            os.close(slave)  # else EIO never comes when the shell exits
    if master is not None:
        outputs = [asyncio.create_task(_quietly(_pty_output(master, process.stdout)))]
    else:
        outputs = [
            asyncio.create_task(_quietly(_stream_output(proc.stdout, process.stdout))),
            asyncio.create_task(_quietly(_stream_output(proc.stderr, process.stderr))),
        ]
    feeder = asyncio.create_task(_quietly(_input(process, proc, master)))
    try:
        returncode = await _finish(proc, outputs, process)
    finally:
        feeder.cancel()
        for task in outputs:
            task.cancel()
        if master is not None:
            os.close(master)
    log.info("session ended pid=%d status=%d", proc.pid, returncode)
    _report_exit(process, returncode)


class _TargetServer(asyncssh.SSHServer):
    """Allows only the login user, and only with a CA-signed certificate."""

    def __init__(self, login_user: str, ca_line: str, activity: Activity) -> None:
        self._login_user = login_user
        self._authorized = asyncssh.import_authorized_keys(
            f'cert-authority,principals="{login_user}" {ca_line}\n'
        )
        self._activity = activity

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._activity.opened()

    def connection_lost(self, exc: Exception | None) -> None:
        self._activity.closed()

    def begin_auth(self, username: str) -> bool:
        # The principals= option alone does not tie the principal to the
        # requested user name, so only the login user gets the CA at all.
        if username == self._login_user:
            self._conn.set_authorized_keys(self._authorized)
        return True

    def public_key_auth_supported(self) -> bool:
        return True


def _session_handler(
    login_user: str,
) -> Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]]:
    async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
        try:
            account = pwd.getpwnam(login_user)
        except KeyError:
            process.stderr.write(f"rly-client: no such user {login_user}\r\n".encode())
            process.exit(1)
            return
        if process.subsystem:
            process.stderr.write(f"subsystem {process.subsystem} not supported\r\n".encode())
            process.exit(1)
            return
        await run_session(process, account)

    return handle


class ExitStatusSFTPServer(asyncssh.SFTPServer):
    """The builtin sftp subsystem, reporting exit status 0 when the session ends.

    asyncssh's SFTP server closes the channel without an exit status, which
    OpenSSH's scp reads as a failure (exit 1) although the file arrived;
    OpenSSH's own sftp-server exits 0 when the client closes its end.
    `exit()` is asyncssh's public end-of-session hook.
    """

    def exit(self) -> None:
        super().exit()
        with contextlib.suppress(OSError):  # the channel is gone already: nobody to tell
            self.channel.exit(0)


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """The builtin server's host key, generated at enrollment."""
    return asyncssh.read_private_key(str(path))


class _ControlAware:
    """asyncssh.listen's tunnel: the relay's control channels (core.data_wire) go to the
    dialer instead of the builtin server."""

    def __init__(self, conn: asyncssh.SSHClientConnection, dialer: DataDialer) -> None:
        self._conn = conn
        self._dialer = dialer

    async def create_server(
        self, factory: Callable[[str, int], Any], _host: str, port: int
    ) -> asyncssh.SSHListener:
        def dispatch(orig_host: str, orig_port: int) -> Any:
            if orig_host == CONTROL_HOST:
                return self._dialer.control_session()
            return factory(orig_host, orig_port)

        return await self._conn.create_server(dispatch, "", port)


async def serve_builtin(
    conn: asyncssh.SSHClientConnection,
    config: ClientConfig,
    activity: Activity,
    dialer: DataDialer | None = None,
) -> asyncssh.SSHAcceptor:
    """Ask the relay for the remote forward and serve SSH on the channels it opens."""
    tunnel: Any = conn if dialer is None else _ControlAware(conn, dialer)
    return await asyncssh.listen(
        "",
        0,
        tunnel=tunnel,
        server_factory=lambda: _TargetServer(config.login_user, config.user_ca, activity),
        **_builtin_options(config),
    )


async def serve_builtin_stream(
    sock: socket.socket, config: ClientConfig, activity: Activity
) -> None:
    """Serve one data connection with the builtin server, directly on its socket.

    Cancelled (its tunnel ended: `DataDialer.close`), it closes the connection, so
    the relay at the far end, which may not be the tunnel's, sees the session end.
    """
    conn = await asyncssh.run_server(
        sock,
        server_factory=lambda: _TargetServer(config.login_user, config.user_ca, activity),
        **_builtin_options(config),
    )
    try:
        await conn.wait_closed()
    finally:
        conn.abort()


def _builtin_options(config: ClientConfig) -> dict[str, Any]:
    if config.host_key_file is None:
        raise OSError("config key 'host_key_file' is missing (needed by target 'builtin')")
    options: dict[str, Any] = {
        "server_host_keys": [load_host_key(config.host_key_file)],
        "process_factory": _session_handler(config.login_user),
        "sftp_factory": ExitStatusSFTPServer,  # scp and sftp through ProxyJump (SPEC §6.7)
        "encoding": None,
        "allow_scp": False,
        "agent_forwarding": False,
        "x11_forwarding": False,
        "login_timeout": LOGIN_TIMEOUT,
        "kex_algs": KEX_ALGS,
        "encryption_algs": ENCRYPTION_ALGS,
        "mac_algs": MAC_ALGS,
        "compression_algs": None,
        "config": None,
    }
    return options


async def fetch_sshd_host_key(host: str, port: int, timeout: float = 5.0) -> str | None:
    """The local sshd's host key line (sent at enrollment), or None if unreachable."""
    for algs in (["ssh-ed25519"], ()):  # prefer ed25519, else whatever sshd offers
        try:
            key = await asyncio.wait_for(
                asyncssh.get_server_host_key(host, port, server_host_key_algs=algs, config=None),
                timeout,
            )
        except (OSError, asyncssh.Error):
            continue
        if key is not None:
            return key.export_public_key().decode("ascii").strip()
    return None


def generate_host_key() -> asyncssh.SSHKey:
    """A fresh ed25519 host key for the builtin target."""
    return asyncssh.generate_private_key("ssh-ed25519")


def current_user() -> str:
    """The user rly-client runs as (the default shell owner when not root)."""
    return pwd.getpwuid(os.getuid()).pw_name
