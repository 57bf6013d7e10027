"""Dial requests from the relay, and the data connections they open.

The relay sends a dial request as one JSON line on a control channel of the
tunnel (`ControlSession`) or in a check-in answer; `DataDialer.request`
checks it and opens the data connection (relay.device.port on the far end).
The connection then serves the target: spliced to the local sshd (no Python
per byte, device_client.data_splice) or run by the builtin SSH server
directly on the socket (one asyncssh layer on the device). Each open data
connection counts as activity, so an on-demand tunnel does not idle out
under a running session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from core.data_wire import REQUEST_MAX
from device_client.config import ClientConfig
from device_client.data_dial import DialRequest, dial_data, parse_request
from device_client.data_splice import splice
from device_client.proxy import dial_tcp
from device_client.tunnel import Activity

log = logging.getLogger(__name__)
MAX_DATA_CONNECTIONS = 32  # per device at once; more requests are ignored
TARGET_TIMEOUT = 5.0


class ControlSession(asyncssh.SSHTCPSession[bytes]):
    """A control channel from the relay: one JSON line, then it closes."""

    def __init__(self, dialer: DataDialer) -> None:
        self._dialer = dialer
        self._buf = b""
        self._chan: asyncssh.SSHTCPChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._buf += data
        if b"\n" in self._buf or len(self._buf) > REQUEST_MAX:
            self._finish()

    def eof_received(self) -> bool:
        self._finish()
        return False

    def _finish(self) -> None:
        line, self._buf = self._buf.split(b"\n", 1)[0], b""
        if line:
            self._dialer.request(line[: REQUEST_MAX + 1])
        if self._chan is not None:
            self._chan.close()
            self._chan = None


class DataDialer:
    """Opens data connections for one tunnel's device; `also` is the tunnel's own endpoint."""

    def __init__(
        self,
        config: ClientConfig,
        activity: Activity,
        also: tuple[tuple[str, int], ...] = (),
        connect: Callable[[str, int], Awaitable[socket.socket]] | None = None,
        also_first: bool = False,
    ) -> None:
        self.config = config
        self.activity = activity
        self.also = also
        # the tunnel's way out (device_client.dialer.data_connector): proxy, WebSocket
        self.connect = connect or functools.partial(dial_tcp, config.proxy)
        self.also_first = also_first
        self._tasks: set[asyncio.Task[None]] = set()

    def control_session(self) -> ControlSession:
        return ControlSession(self)

    def request(self, raw: bytes | dict[str, Any]) -> None:
        """Start one data connection for a dial request (bytes of JSON, or the parsed object)."""
        try:
            data = json.loads(raw) if isinstance(raw, bytes) else raw
        except ValueError:
            data = None
        request = parse_request(data)
        if request is None:
            log.warning("ignored a malformed dial request")
            return
        if len(self._tasks) >= MAX_DATA_CONNECTIONS:
            log.warning("ignored a dial request: %d data connections open", len(self._tasks))
            return
        task = asyncio.get_running_loop().create_task(self._serve(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: DialRequest) -> None:
        with self.activity.track():
            try:
                sock = await dial_data(request, self.also, self.connect, also_first=self.also_first)
            except OSError as exc:
                log.warning("data connection for session %s failed: %s", request.session, exc)
                return
            log.info("data connection up session=%s relay=%s", request.session, request.relay)
            try:
                if self.config.target == "builtin":
                    from device_client.target import serve_builtin_stream  # pty off import path

                    await serve_builtin_stream(sock, self.config, self.activity)
                else:
                    await splice(sock, await self._target())
            except (OSError, TimeoutError, asyncssh.Error) as exc:
                log.warning("data connection session=%s ended: %s", request.session, exc)
                sock.close()
            log.info("data connection down session=%s", request.session)

    async def _target(self) -> socket.socket:
        """A connected socket to the local sshd."""
        loop = asyncio.get_running_loop()
        host, port = self.config.target_host, self.config.target_port
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _name, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), TARGET_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        if family in (socket.AF_INET, socket.AF_INET6):  # keystrokes must not wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self) -> None:
        """Stop every data connection of this tunnel (the tunnel ended)."""
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
