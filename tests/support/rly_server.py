"""`rly serve` as a real process on loopback ports chosen by the kernel.

    server = RlyServer(tmp_path, config={"relay": {"approval_ttl": "10s"}}).start()
    server.run_cli("enroll-token", "create", "--account", "acme")
    tech = Technician(server.technician_port)

The config TOML (BASE_CONFIG deep-merged with `config`) lives in a 0700 data
directory. Start-up is read from the contract lines `rly serve` prints on stdout:
`rly: technician ssh on H:P`, `rly: device ssh on H:P` (one per port),
`rly: http on H:P`, `rly: tracker URL/api/v1` (when the tracker runs),
`rly: portal URL ...` (when the portal runs), `rly: ready`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import tomli_w

from tests.support.paths import private_dir
from tests.support.procs import ManagedProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG: Mapping[str, Any] = {
    "relay": {
        "listen": "127.0.0.1",
        "technician_port": 0,
        "device_ports": [0],
        "peering_port": 0,  # several relays on one host in one run
        "public_host": "127.0.0.1",
    },
    "http": {"listen": "127.0.0.1", "port": 0},
}
_T = TypeVar("_T")
_ANNOUNCE = re.compile(
    r"^rly: (technician ssh on|device ssh on|http on|tracker|portal|ready)\s*(\S*)"
)


class RlyServer:
    """One `rly serve` process with its own data directory and config file."""

    def __init__(
        self,
        workdir: Path,
        *,
        config: Mapping[str, Any] | None = None,
        database_url: str | None = None,
        only: str | None = None,
        command: Sequence[str] = (sys.executable, "-m", "rly"),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Write the config; `only` is "relay", "tracker" or "portal" for `serve --only`."""
        self.workdir = workdir
        self.data_dir = private_dir(workdir, "rly-data")
        self.config_path = self.data_dir / "rly.toml"
        self.config: dict[str, Any] = deep_merge(BASE_CONFIG, {"data_dir": str(self.data_dir)})
        if database_url is not None:
            self.config["database_url"] = database_url
        self.config = deep_merge(self.config, config or {})
        self.command = list(command)
        self.only = only
        self.env = {**_clean_environ(), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: ManagedProcess | None = None
        self._reset_ports()
        self.write_config()

    def _reset_ports(self) -> None:
        self._technician_port: int | None = None
        self.device_ports: list[int] = []
        self._http_port: int | None = None
        self._base_url: str | None = None

    def write_config(self) -> None:
        """Write `self.config` to `config_path` (mode 0600)."""
        self.config_path.write_text(tomli_w.dumps(self.config))
        self.config_path.chmod(0o600)

    def start(self, timeout: float = 30.0) -> Self:
        """Start `rly serve` and wait for `rly: ready`, recording the announced ports."""
        argv = [*self.command, "serve", "--config", str(self.config_path)]
        if self.only is not None:
            argv += ["--only", self.only]
        self._reset_ports()
        self.process = ManagedProcess(
            argv, workdir=self.workdir, name="rly", env=self.env, cwd=REPO_ROOT
        )
        self.process.start()
        try:
            self._read_announcements(self.process, timeout)
        except BaseException:
            self.process.stop()
            raise
        return self

    def _read_announcements(self, process: ManagedProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            found = process.wait_for_line(_ANNOUNCE, max(deadline - time.monotonic(), 0.0))
            kind, value = found.group(1), found.group(2)
            if kind == "ready":
                return
            if kind == "portal":
                self._base_url = value.rstrip("/")
            elif kind == "tracker":  # the same HTTP server; the portal line, if any, follows
                self._base_url = value.removesuffix("/api/v1")
            else:
                port = int(value.rsplit(":", 1)[1])
                if kind == "technician ssh on":
                    self._technician_port = port
                elif kind == "device ssh on":
                    self.device_ports.append(port)
                else:
                    self._http_port = port

    @property
    def technician_port(self) -> int:
        """The technician SSH port (this process must run the relay)."""
        return _announced(self._technician_port, "technician ssh")

    @property
    def device_port(self) -> int:
        """The first device SSH port."""
        return _announced(self.device_ports[0] if self.device_ports else None, "device ssh")

    @property
    def http_port(self) -> int:
        """The HTTP (tracker API and portal) port."""
        return _announced(self._http_port, "http")

    @property
    def base_url(self) -> str:
        """The HTTP server's URL as announced, e.g. http://127.0.0.1:PORT (no trailing slash)."""
        return _announced(self._base_url, "portal")

    def rebase(self, url: str) -> str:
        """Point a URL built from http.public_url (an approval link, say) at this server."""
        base = urlsplit(self.base_url)
        return urlunsplit(urlsplit(url)._replace(scheme=base.scheme, netloc=base.netloc))

    def run_cli(
        self, *args: str, input: str | None = None, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run `rly ARGS --config FILE` to completion and return its result (text)."""
        return subprocess.run(
            [*self.command, *args, "--config", str(self.config_path)],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=REPO_ROOT,
            check=check,
        )

    @property
    def output(self) -> str:
        """The current process's stdout and stderr so far."""
        return self.process.output if self.process else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); return the exit code."""
        return self.process.stop(timeout) if self.process else None

    def kill(self) -> int | None:
        """SIGKILL at once, as a crash would."""
        return self.process.kill() if self.process else None

    def restart(self, *, keep_ports: bool = True, timeout: float = 30.0) -> Self:
        """Stop and start again; `keep_ports` pins the same ports in the config first."""
        ports = (self._technician_port, list(self.device_ports), self._http_port)
        self.stop()
        if keep_ports:
            pinned: dict[str, dict[str, Any]] = {"relay": {}, "http": {}}
            if ports[0] is not None:
                pinned["relay"]["technician_port"] = ports[0]
            if ports[1]:
                pinned["relay"]["device_ports"] = ports[1]
            if ports[2] is not None:
                pinned["http"]["port"] = ports[2]
            self.config = deep_merge(self.config, pinned)
            self.write_config()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self if self.process is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `override` merged in, tables recursively."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _announced(value: _T | None, what: str) -> _T:
    if value is None:
        raise AssertionError(
            f"rly serve did not announce its {what} listener (not started, or --only)"
        )
    return value


def _clean_environ() -> dict[str, str]:
    """The test environment without RLY_* settings overrides (RLY_TEST_* stays)."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith("RLY_") or k.startswith("RLY_TEST_")
    }


class RlyFactory:
    """Starts RlyServers in one directory (the `rly_factory` fixture); `stop_all()` stops them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.servers: list[RlyServer] = []

    def __call__(self, **kwargs: Any) -> RlyServer:
        """Create `RlyServer(workdir, **kwargs)`, start it and return it."""
        server = RlyServer(self.workdir, **kwargs)
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        """Stop every server started here."""
        while self.servers:
            self.servers.pop().stop()
