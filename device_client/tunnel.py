"""The outbound SSH connection to a relay that carries the device's tunnel.

The device trusts only the relay host CA pinned at enrollment, authenticates
with its own key, and asks for exactly one remote forward; channels the relay
opens on it go to the local target (sshd over TCP, or the builtin server).
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncssh

from core.data_wire import CONTROL_HOST
from device_client.config import ClientConfig
from device_client.dialer import data_connector, describe, dial_relay

if TYPE_CHECKING:
    from device_client.data_sessions import DataDialer

log = logging.getLogger(__name__)

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
BACKOFF_CAP_ENV = "RLY_CLIENT_BACKOFF_CAP"
STABLE_AFTER = 30.0  # a tunnel that stayed up this long resets the backoff


def backoff_cap_from_env() -> float:
    """The backoff cap: 60 s, lowered by $RLY_CLIENT_BACKOFF_CAP (for tests)."""
    raw = os.environ.get(BACKOFF_CAP_ENV)
    if not raw:
        return BACKOFF_CAP
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{BACKOFF_CAP_ENV} must be a positive number of seconds")
    return min(value, BACKOFF_CAP)


AFTER_DROP_SPREAD = 40.0  # seconds over which devices return after their relay restarts


@dataclass
class Backoff:
    """Exponential backoff with full jitter: sleep uniform(0, min(cap, base*2^n))."""

    base: float = BACKOFF_BASE
    cap: float = BACKOFF_CAP
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.base * 2.0 ** min(self.attempt, 32))

    def next_delay(self) -> float:
        """The next delay; each call doubles the ceiling up to the cap."""
        delay = self.rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def after_drop(self) -> float:
        """The first retry after an established tunnel dropped: uniform over the whole cap.

        Every device of a relay loses its tunnel at the same moment when that relay
        restarts; spreading their return over the cap keeps them from arriving as a
        herd (about 1/cap of them per second). A repair or open request from the
        tracker still cuts the wait short. The spread is at most AFTER_DROP_SPREAD so
        10,000 devices arrive at ~250/s, under what one relay process can log in.
        """
        self.attempt += 1
        return self.rng.uniform(0, min(self.cap, AFTER_DROP_SPREAD))

    def reset(self) -> None:
        """Start again from the base (after a tunnel proved stable)."""
        self.attempt = 0


class Activity:
    """Counts open channels and remembers when the last one closed (idle timeout)."""

    def __init__(self) -> None:
        self.open = 0
        self.idle_since = time.monotonic()

    def opened(self) -> None:
        self.open += 1

    def closed(self) -> None:
        self.open = max(0, self.open - 1)
        if self.open == 0:
            self.idle_since = time.monotonic()

    @contextmanager
    def track(self) -> Iterator[None]:
        """Count one channel for the duration of the block."""
        self.opened()
        try:
            yield
        finally:
            self.closed()

    def idle_for(self) -> float:
        """Seconds without any open channel (0 while one is open)."""
        return 0.0 if self.open else time.monotonic() - self.idle_since


class _CountedForward(asyncssh.SSHTCPSession[bytes]):
    """Wraps asyncssh's TCP forwarder so the tunnel knows how many channels are open."""

    def __init__(self, inner: asyncssh.SSHTCPSession[bytes], activity: Activity) -> None:
        self._inner = inner
        self._activity = activity
        activity.opened()

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._inner.connection_made(chan)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._inner.connection_lost(exc)
        finally:
            self._activity.closed()

    def session_started(self) -> None:
        self._inner.session_started()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._inner.data_received(data, datatype)

    def eof_received(self) -> bool:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


async def forward_to_target(
    conn: asyncssh.SSHClientConnection,
    config: ClientConfig,
    activity: Activity,
    dialer: DataDialer | None = None,
) -> int:
    """Ask the relay for the remote forward to a TCP target; return the port it gave.

    With a dialer, the relay's control channels (core.data_wire) go to the
    dialer instead of the target.
    """
    host, port = config.target_host, config.target_port

    async def session_factory(orig_host: str, _orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
        if dialer is not None and orig_host == CONTROL_HOST:
            return dialer.control_session()
        inner = await conn.forward_connection(host, port)
        return _CountedForward(inner, activity)  # type: ignore[arg-type]

    listener = await conn.create_server(session_factory, "", 0)
    return listener.get_port()


@dataclass
class Tunnel:
    """A live tunnel: the connection plus where it landed."""

    conn: asyncssh.SSHClientConnection
    relay: str
    port: int
    remote_port: int
    since: float
    activity: Activity
    server: asyncssh.SSHAcceptor | None = None
    dialer: DataDialer | None = None  # the data connections asked for on this tunnel
    endpoint: str = ""  # the relay endpoint URL it came up on (remembered as the last good)
    transport: str = "ssh"  # ssh, ssh+connect, wss, wss+connect

    async def close(self) -> None:
        """Close the connection (and the builtin server and data connections riding it)."""
        if self.dialer is not None:
            self.dialer.close()
        if self.server is not None:
            self.server.close()
        self.conn.close()
        await self.conn.wait_closed()

    def __str__(self) -> str:
        return f"{self.relay}:{self.port}"


async def open_tunnel(
    config: ClientConfig, key: asyncssh.SSHKey, last_good: str | None = None
) -> Tunnel:
    """Dial the relay (`device_client.dialer`: last good endpoint first, the rest staggered)
    and ask for the forward; raises OSError or asyncssh.Error when that fails.
    """
    from device_client.data_sessions import DataDialer
    from device_client.target import serve_builtin  # keeps pty/termios off the import path

    dialled = await dial_relay(config, key, last_good)
    conn, endpoint = dialled.conn, dialled.endpoint
    activity = Activity()
    dialer = DataDialer(
        config,
        activity,
        also=((endpoint.host, endpoint.port),),
        connect=data_connector(config, endpoint),
        also_first=endpoint.websocket,  # came in over a WebSocket: data goes the same way
    )
    try:
        server = None
        if config.target == "builtin":
            server = await serve_builtin(conn, config, activity, dialer)
            remote_port = server.get_port()
        else:
            remote_port = await forward_to_target(conn, config, activity, dialer)
    except (OSError, asyncssh.Error, asyncssh.ChannelListenError) as exc:
        # a relay that logs us in and then refuses the forward (device pending or
        # revoked) closes the connection itself
        conn.close()
        raise OSError(f"relay {endpoint} refused the tunnel: {describe(exc)}") from None
    return Tunnel(
        conn=conn,
        relay=endpoint.host,
        port=endpoint.port,
        remote_port=remote_port,
        since=time.time(),
        activity=activity,
        server=server,
        dialer=dialer,
        endpoint=str(endpoint),
        transport=dialled.transport,
    )
