"""A small JSON file the `run` loop rewrites on each state change.

`rly-client status` reads it from another process, so it is replaced
atomically and holds nothing secret (no keys, no tokens).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ClientState:
    """What the running client last knew about itself."""

    pid: int
    started: float
    config_path: str
    last_checkin: float | None = None
    checkin_result: str | None = None
    device_status: str | None = None
    tunnel_state: str = "down"
    relay: str | None = None
    port: int | None = None
    since: float | None = None
    tunnel_error: str | None = None  # why the tunnel is not up (last failure or end), for status
    stopped: float | None = None
    transport: str | None = None  # how the tunnel travels: ssh, ssh+connect, wss, wss+connect
    last_endpoint: str | None = None  # the relay endpoint that last worked: tried first next time


def write_state(path: Path, state: ClientState) -> None:
    """Replace the state file atomically so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(dataclasses.asdict(state), indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_state(path: Path) -> ClientState | None:
    """The last written state, or None when there is none or it is unreadable."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        known = {field.name for field in dataclasses.fields(ClientState)}
        return ClientState(**{key: value for key, value in data.items() if key in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StateFile:
    """Holds the current state and writes it only when something changed."""

    def __init__(self, path: Path, config_path: Path) -> None:
        self.path = path
        previous = read_state(path)  # keeps the last good endpoint across restarts
        self.state = ClientState(
            pid=os.getpid(),
            started=time.time(),
            config_path=str(config_path),
            last_endpoint=previous.last_endpoint if previous else None,
        )
        write_state(path, self.state)

    def update(self, **changes: Any) -> None:
        """Apply changes and write the file if any value differs."""
        new = dataclasses.replace(self.state, **changes)
        if new != self.state:
            self.state = new
            write_state(self.path, new)
