"""What `rly-client status` prints: one fact per line, from the state file and the tracker.

The running client's state file says what it last knew (check-in result,
tunnel, why the tunnel is not up); `--tracker` adds what the tracker says now.
A refusal is an answer too: 403 reads `revoked`, 404 `unknown to the tracker`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from device_client.api import TrackerClient, TrackerError
from device_client.config import ClientConfig
from device_client.dialer import tls_trust
from device_client.state import ClientState, pid_alive, read_state
from device_client.systemd import service_active


@dataclass(frozen=True)
class StatusReport:
    """The lines to print and whether the tunnel is up (exit status 0, else 3)."""

    lines: list[str]
    tunnel_up: bool


@dataclass(frozen=True)
class RemoteStatus:
    """The tracker's view of this device, as plain words."""

    status: str
    last_checkin: str
    tunnel: str


def status_report(config: ClientConfig, config_path: Path, *, ask_tracker: bool) -> StatusReport:
    """The lines to print; `ask_tracker` adds the tracker's own view (one signed request)."""
    state = read_state(config.state_file)
    running = state is not None and state.stopped is None and pid_alive(state.pid)
    active = service_active()
    service = f"running (pid {state.pid})" if running and state else "not running"
    if active is not None:
        service += f"; systemd unit rly-client is {'active' if active else 'inactive'}"
    lines = [
        f"service:       {service}",
        f"tracker:       {config.tracker_url}",
        f"device:        {config.device_id}",
    ]
    if ask_tracker:
        remote = asyncio.run(remote_status(config))
        lines.append(f"status:        {remote.status} (tracker, now)")
        lines.append(f"tracker saw:   last check-in {remote.last_checkin}; tunnel {remote.tunnel}")
    else:
        known = state.device_status if state and state.device_status else "unknown"
        lines.append(f"status:        {known} (at the last check-in)")
    result = f": {state.checkin_result}" if state and state.checkin_result else ""
    lines.append(f"last check-in: {ago(state.last_checkin if state else None)}{result}")
    tunnel_up = running and state is not None and state.tunnel_state == "up"
    if tunnel_up and state:
        over = f" over {state.transport}" if state.transport else ""
        lines.append(
            f"tunnel:        up via {state.relay}:{state.port}{over} since {ago(state.since)}"
        )
    else:
        lines.append(f"tunnel:        {tunnel_down(state, running)}")
    lines.append(f"config:        {config_path}")
    return StatusReport(lines, tunnel_up)


def ago(stamp: float | None) -> str:
    """A local timestamp with its age, or 'never'."""
    if stamp is None:
        return "never"
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp))
    return f"{when} ({max(0, int(time.time() - stamp))}s ago)"


def tunnel_down(state: ClientState | None, running: bool) -> str:
    """'down: why' (or 'connecting (last error: why)') from the runner's state file."""
    if not running or state is None:
        return "down: rly-client is not running"
    why = state.tunnel_error or "no tunnel yet"
    if state.tunnel_state == "connecting":
        return f"connecting (last error: {why})" if state.tunnel_error else "connecting"
    return f"down: {why}"


async def remote_status(config: ClientConfig) -> RemoteStatus:
    """GET the device's own status; a refusal or an outage is a status too."""
    key = asyncssh.read_private_key(str(config.key_file))
    async with TrackerClient(
        config.tracker_url,
        device_id=config.device_id,
        key=key,
        proxy=config.proxy,
        trust=tls_trust(config),
    ) as t:
        try:
            view = await t.device_status()
        except TrackerError as exc:
            status = {403: "revoked", 404: "unknown to the tracker"}.get(exc.status_code or 0)
            return RemoteStatus(f"{status or 'unknown'} ({exc})", "-", "-")
    tunnel = view.get("tunnel")
    if isinstance(tunnel, dict):
        relay, since = plain(tunnel.get("relay_node")), plain(tunnel.get("connected_at"))
        where = f"up on relay {relay} since {since}"
    else:
        where = "none"
    return RemoteStatus(
        plain(view.get("status", "unknown")), plain(view.get("last_checkin_at") or "never"), where
    )


def plain(value: object) -> str:
    """Tracker-sent text for a terminal line: printable characters only."""
    return "".join(ch for ch in str(value) if ch.isprintable())[:200]
