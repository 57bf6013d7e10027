"""A technician at a terminal: the real OpenSSH `ssh` client driven through a PTY by pexpect.

    tech = Technician(server.technician_port)  # ssh partner@127.0.0.1, answers the gate password
    url = tech.expect(r"(http://\\S+/approve/\\S+)").group(1)
    ...
    tech.sendline("list"); tech.expect("dev-1")
    tech.close()

Every expectation failure raises AssertionError with the end of the transcript.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pexpect

SSH = "/usr/bin/ssh"
DEFAULT_OPTIONS: Mapping[str, str] = {
    "StrictHostKeyChecking": "no",
    "UserKnownHostsFile": "/dev/null",
    "PubkeyAuthentication": "no",
    # OpenSSH's default: it prints the approval link of the keyboard-interactive login (at
    # ERROR it would hide it, and the session then shows only a waiting line).
    "LogLevel": "INFO",
    "NumberOfPasswordPrompts": "1",
    "ServerAliveInterval": "0",
}


class Technician:
    """One `ssh` client session in a pseudo-terminal."""

    def __init__(
        self,
        port: int,
        *,
        user: str = "partner",
        host: str = "127.0.0.1",
        password: str | None = "partner",  # noqa: S107 - the documented, non-secret gate password
        identity_file: Path | None = None,
        options: Mapping[str, str | None] | None = None,
        args: Sequence[str] = (),
        command: Sequence[str] = (),
        rows: int = 24,
        cols: int = 80,
        timeout: float = 10.0,
    ) -> None:
        """Start `ssh`; if `password` is given, wait for the password prompt and answer it.

        `options` override DEFAULT_OPTIONS (None removes one); with `identity_file`,
        public-key authentication is turned on. `args` go before the destination
        (e.g. "-t", "-J", ...), `command` after it.
        """
        self.transcript = io.StringIO()
        self.timeout = timeout
        self.argv = _ssh_argv(port, user, host, identity_file, options, args, command)
        self.child = pexpect.spawn(
            self.argv[0],
            self.argv[1:],
            dimensions=(rows, cols),
            encoding="utf-8",
            codec_errors="replace",
            timeout=timeout,
            env=_client_env(),
        )
        self.child.logfile_read = self.transcript
        if password is not None:
            try:
                self.expect(r"(?i)password[^\n]*:")
            except AssertionError:
                self.close()
                raise
            self.sendline(password)

    @property
    def output(self) -> str:
        """Everything the client printed so far."""
        return self.transcript.getvalue()

    def expect(self, pattern: str | re.Pattern[str], timeout: float | None = None) -> re.Match[str]:
        """Wait for `pattern` (a regex) in the output after the last match and return the match."""
        try:
            self.child.expect(pattern, timeout=self.timeout if timeout is None else timeout)
        except pexpect.TIMEOUT:
            raise AssertionError(f"no {_show(pattern)} within timeout\n{self._tail()}") from None
        except pexpect.EOF:
            raise AssertionError(f"ssh ended before {_show(pattern)}\n{self._tail()}") from None
        found = self.child.match
        assert isinstance(found, re.Match)
        return found

    def expect_eof(self, timeout: float | None = None) -> int | None:
        """Wait for the session to end and return ssh's exit status (None if killed by a signal)."""
        try:
            self.child.expect(pexpect.EOF, timeout=self.timeout if timeout is None else timeout)
        except pexpect.TIMEOUT:
            raise AssertionError(f"ssh still running after timeout\n{self._tail()}") from None
        self.child.close()
        return self.exitstatus

    def send(self, text: str) -> None:
        """Type `text` without a newline."""
        self.child.send(text)

    def sendline(self, text: str = "") -> None:
        """Type `text` and Enter."""
        self.child.sendline(text)

    def sendcontrol(self, char: str) -> None:
        """Type Ctrl-`char` (e.g. "c")."""
        self.child.sendcontrol(char)

    def resize(self, rows: int, cols: int) -> None:
        """Resize the terminal; the kernel sends ssh SIGWINCH, which forwards the new size."""
        self.child.setwinsize(rows, cols)

    @property
    def alive(self) -> bool:
        """Whether ssh is still running."""
        return bool(self.child.isalive())

    @property
    def exitstatus(self) -> int | None:
        """ssh's exit status once it ended (255 is a connection error), else None."""
        status = self.child.exitstatus
        return None if status is None else int(status)

    def close(self) -> None:
        """End ssh, killing it if it does not exit on SIGHUP/SIGINT; safe to call twice."""
        if not self.child.closed:
            self.child.close(force=True)

    def _tail(self, chars: int = 2000) -> str:
        return "--- ssh transcript (end):\n" + self.output[-chars:]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _ssh_argv(
    port: int,
    user: str,
    host: str,
    identity_file: Path | None,
    options: Mapping[str, str | None] | None,
    args: Sequence[str],
    command: Sequence[str],
) -> list[str]:
    merged: dict[str, str | None] = {**DEFAULT_OPTIONS}
    if identity_file is not None:
        merged.update(
            PubkeyAuthentication="yes", IdentitiesOnly="yes", IdentityFile=str(identity_file)
        )
    merged.update(options or {})
    argv = [SSH, "-F", "/dev/null", "-p", str(port)]
    for key, value in merged.items():
        if value is not None:
            argv += ["-o", f"{key}={value}"]
    return [*argv, *args, f"{user}@{host}", *command]


def _client_env() -> dict[str, str]:
    """The test's environment without an ssh agent, with a known terminal type."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    return {**env, "TERM": "xterm-256color", "LANG": "C.UTF-8"}


def _show(pattern: str | re.Pattern[str]) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)


class TechnicianFactory:
    """Starts Technician sessions (the `technician_factory` fixture); `close_all()` kills them."""

    def __init__(self) -> None:
        self.sessions: list[Technician] = []

    def __call__(self, port: int, **kwargs: Any) -> Technician:
        """Start and return `Technician(port, **kwargs)`."""
        tech = Technician(port, **kwargs)
        self.sessions.append(tech)
        return tech

    def close_all(self) -> None:
        """Close every session started here."""
        while self.sessions:
            self.sessions.pop().close()
