"""Subprocesses that tests start and are sure to stop.

`ManagedProcess` runs a command in its own process group with stdout and
stderr going to files in a work directory, lets a test wait for a line of
output, and on `stop()` sends SIGTERM to the group, waits, then SIGKILLs the
group. `ProcessFactory` (the `process_factory` fixture) stops everything it
started at teardown; an atexit hook kills whatever is still running if the
interpreter exits without teardown.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

Stream = Literal["stdout", "stderr"]
Argv = Sequence[str | os.PathLike[str]]

_LIVE: set[ManagedProcess] = set()


class ProcessExited(RuntimeError):
    """The process ended while a test was waiting for its output."""


class ManagedProcess:
    """One subprocess in its own process group, with its output captured to files."""

    def __init__(
        self,
        argv: Argv,
        *,
        workdir: Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.name = _unique_name(workdir, name or Path(self.argv[0]).name)
        self.stdout_path = workdir / f"{self.name}.stdout"
        self.stderr_path = workdir / f"{self.name}.stderr"
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._cursor: dict[Stream, int] = {"stdout": 0, "stderr": 0}

    def start(self) -> Self:
        """Start the process (once); output goes to `stdout_path` and `stderr_path`."""
        if self._proc is not None:
            raise RuntimeError(f"{self.name} was already started")
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self._env,
                cwd=self._cwd,
                start_new_session=True,
            )
        _LIVE.add(self)
        return self

    def __enter__(self) -> Self:
        return self if self._proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} rc={self.returncode}>"

    @property
    def pid(self) -> int:
        """The process id, which is also its process group id."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code (negative signal number), or None while running."""
        return None if self._proc is None else self._proc.poll()

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._proc is not None and not self._leader_exited()

    @property
    def stdout(self) -> str:
        """Everything the process wrote to stdout so far."""
        return _read(self.stdout_path)

    @property
    def stderr(self) -> str:
        """Everything the process wrote to stderr so far."""
        return _read(self.stderr_path)

    @property
    def output(self) -> str:
        """Stdout then stderr, for assertions that do not care which."""
        return self.stdout + self.stderr

    def tail(self, lines: int = 40) -> str:
        """The last lines of both streams, labelled, for failure messages."""
        parts = [
            f"--- {self.name} (pid {self._proc.pid if self._proc else '-'}) rc={self.returncode}"
        ]
        for stream in ("stdout", "stderr"):
            text = self.stdout if stream == "stdout" else self.stderr
            parts.append(f"--- {stream}:\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def wait_for_line(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, stream: Stream = "stdout"
    ) -> re.Match[str]:
        """Return the match of the first line, after the last matched one, that `pattern` searches.

        Each stream has a cursor, so successive calls read successive lines.
        Raises ProcessExited if the process ends first, TimeoutError on timeout.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running
            found = self._scan(regex, stream, include_partial=exited)
            if found is not None:
                return found
            if exited:
                raise ProcessExited(
                    f"{self.name} exited before printing {regex.pattern!r}\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: no {regex.pattern!r} within {timeout:g}s\n{self.tail()}"
                )
            time.sleep(0.02)

    def _scan(
        self, regex: re.Pattern[str], stream: Stream, *, include_partial: bool
    ) -> re.Match[str] | None:
        path = self.stdout_path if stream == "stdout" else self.stderr_path
        text = _read(path)
        pos = self._cursor[stream]
        for line in text[pos:].splitlines(keepends=True):
            if not line.endswith("\n") and not include_partial:
                break
            pos += len(line)
            found = regex.search(line.rstrip("\r\n"))
            if found is not None:
                self._cursor[stream] = pos
                return found
        return None

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit by itself and return its exit code."""
        if self._proc is None:
            raise RuntimeError(f"{self.name} was not started")
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{self.name} did not exit within {timeout:g}s\n{self.tail()}"
            ) from None

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the whole process group."""
        _killpg(self.pid, sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the group, wait up to `timeout`, then SIGKILL the group; return the exit code."""
        if self._proc is None:
            return None
        if not self._leader_exited():
            _killpg(self._proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self._leader_exited() and time.monotonic() < deadline:
                time.sleep(0.02)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL the whole group at once and reap the leader; return its exit code."""
        if self._proc is None:
            return None
        # Also kills stragglers after the leader exited. Before the leader is
        # reaped its group id cannot be reused; after, reuse is vanishingly rare.
        _killpg(self._proc.pid, signal.SIGKILL)
        _LIVE.discard(self)
        return self._proc.wait()

    def _leader_exited(self) -> bool:
        """Whether the leader ended, without reaping it (so its group id stays reserved)."""
        assert self._proc is not None
        if self._proc.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None


class ProcessFactory:
    """Starts ManagedProcesses in one work directory and stops them all at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[ManagedProcess] = []

    def __call__(
        self,
        argv: Argv,
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start `argv` and return it; it is stopped by `stop_all()`."""
        return self.adopt(
            ManagedProcess(argv, workdir=self.workdir, name=name, env=env, cwd=cwd).start()
        )

    def adopt(self, proc: ManagedProcess) -> ManagedProcess:
        """Make `stop_all()` stop a process started elsewhere."""
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        """Stop every process, newest first."""
        while self.processes:
            self.processes.pop().stop()

    def report(self, lines: int = 40) -> str:
        """The output tails of every process, for a failed test's report."""
        return "\n".join(p.tail(lines) for p in self.processes)


def _unique_name(workdir: Path, base: str) -> str:
    """Reserve `<name>.stdout` in workdir, adding -2, -3, ... to `base` if taken."""
    name, n = base, 1
    while True:
        try:
            (workdir / f"{name}.stdout").open("x").close()
            return name
        except FileExistsError:
            n += 1
            name = f"{base}-{n}"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        proc.kill()
