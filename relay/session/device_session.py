"""One technician session on one device: tunnel, session row, certificate, bridge, bookkeeping.

Everything that must happen around the byte pump lives here so the menu only
says "connect": waiting for a tunnel (with the seed's words), the SshSession
row and its audit events, host key pinning, the recording, remote close
requests (`session:<id>` on the hub) and the byte counts at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncssh

from core.validate import new_id
from relay.context import RelayContext
from relay.data.accept import DataStream
from relay.data.request import request_data_connection
from relay.device.tunnels import DeviceTunnel
from relay.peering.dial_back import request_dial_back
from relay.peering.pool import PeerCarrier
from relay.peering.route import peer_route
from relay.session import rows
from relay.session.bridge import Bridge, HostKeyMismatch, Traffic, connect_target, host_key_line
from relay.session.recording import Recording, RecordingOptions
from relay.technician.approval_gate import Identity
from relay.technician.device_lookup import DeviceInfo

log = logging.getLogger(__name__)
WAITING = "Waiting for connection..."
GIVING_UP = "Giving up. Cannot connect"
WATCH_INTERVAL = 5.0
ACTIVITY_INTERVAL = 30.0


@dataclass
class Outcome:
    """How a device session ended; exit_status is None when no shell ran."""

    exit_status: int | None
    exit_signal: str | None
    reason: str


Process = TypeVar("Process", bound=asyncssh.SSHServerProcess[Any])


class DeviceSession(Generic[Process]):
    """Typed by the technician's process: text for the menu, bytes for a jump channel."""

    def __init__(
        self,
        ctx: RelayContext,
        process: Process,
        identity: Identity,
        device: DeviceInfo,
        client_ip: str,
        say: Callable[[str], None],
    ) -> None:
        self.ctx = ctx
        self.process = process
        self.identity = identity
        self.device = device
        self.client_ip = client_ip
        self.say = say
        self.traffic = Traffic()
        self.data_stream: DataStream | None = None  # the data connection the session runs on

    async def wait_for_tunnel(self) -> DeviceTunnel | PeerCarrier | None:
        """The device's tunnel on this relay, asking the device to open one if needed; or,
        when its tunnel is (or comes up) on another node of the fleet, peering to that node."""
        device_id = self.device.id
        tunnel = self.ctx.tunnels.get(device_id) or await peer_route(self.ctx, device_id)
        if tunnel is not None:
            return tunnel
        await self.ctx.db(lambda s: rows.request_tunnel(s, device_id, "open"))
        self.ctx.hub.notify(f"device:{device_id}")
        self.say(WAITING)  # after the request is stored, so what the technician reads is true

        async def check() -> DeviceTunnel | PeerCarrier | None:
            # placement may bring the tunnel up on another relay (relay.peering.route)
            return self.ctx.tunnels.get(device_id) or await peer_route(self.ctx, device_id)

        timeout = self.ctx.settings.relay.connect_timeout
        return await self.ctx.hub.wait_until(f"tunnel:{device_id}", check, timeout)

    async def run(self, remote_command: str) -> Outcome:
        carrier = await self.wait_for_tunnel()
        tunnel = carrier if isinstance(carrier, DeviceTunnel) else None
        peer = carrier if isinstance(carrier, PeerCarrier) else None
        if carrier is None:
            timeout = self.ctx.settings.relay.connect_timeout
            self.say(GIVING_UP)
            self.say(f"Device {self.device.id} did not bring up its tunnel within {timeout:g} s.")
            return Outcome(None, None, "no tunnel")
        session_id = new_id()
        stream = None
        if tunnel is not None:
            stream = await request_data_connection(self.ctx, tunnel, self.device.id, session_id)
        elif peer is not None:  # dial-back first: the device dials this node, nobody relays
            stream = await request_dial_back(self.ctx, peer.node, self.device.id, session_id)
        way = _way(peer is not None, stream is not None)
        session_id = await rows.start(
            self.ctx,
            self.identity,
            self.device.id,
            self.client_ip,
            self.traffic,
            session_id=session_id,
            path=way,
        )
        outcome = Outcome(None, None, "connect failed")
        recording: Recording | None = None
        try:
            conn = await self._connect(carrier, session_id, stream)
            if conn is None:
                return outcome
            ends = _ends_with(tunnel, self.data_stream) if tunnel else self._ends_if_revoked()
            async with conn, ends:
                recording = self._start_recording(session_id)
                outcome = await self._bridge(conn, session_id, remote_command, recording)
        finally:
            if stream is not None:
                stream.close()
            if recording is not None:
                recording.close()
            path = str(recording.path) if recording is not None else None
            await asyncio.shield(
                rows.end(self.ctx, session_id, self.identity, self.traffic, outcome, path)
            )
        return outcome

    async def _connect(
        self,
        tunnel: DeviceTunnel | PeerCarrier,
        session_id: str,
        stream: DataStream | None = None,
    ) -> asyncssh.SSHClientConnection | None:
        """SSH to the target over the data connection (if any), else the tunnel or the peer."""
        key, cert = self.ctx.keys.user_certificate(
            session_id=session_id, username=self.identity.username, principal=self.device.login_user
        )
        try:
            conn = await connect_target(
                stream or tunnel,
                login_user=self.device.login_user,
                key=key,
                cert=cert,
                pinned_host_key=self.device.target_host_key,
                timeout=self.ctx.settings.relay.connect_timeout,
            )
        except HostKeyMismatch:
            await rows.host_key_mismatch(self.ctx, self.identity, self.device.id)
            self.say(f"ALERT: device {self.device.id} presented a host key other than its pin.")
            self.say("Refusing to connect; an admin must check the device and re-pin its key.")
            return None
        except (OSError, TimeoutError, asyncssh.Error, asyncssh.ChannelOpenError) as exc:
            # The tunnel path may still work, so no session fails for a broken data
            # connection; a target that stays silent would only make us wait twice.
            if stream is not None and not isinstance(exc, TimeoutError):
                log.warning("data path failed session=%s error=%s; using the tunnel",
                            session_id, _one_line(exc))  # fmt: skip
                stream.close()
                way = _way(isinstance(tunnel, PeerCarrier), False)
                await rows.set_path(self.ctx, session_id, way)
                return await self._connect(tunnel, session_id)
            self.say(GIVING_UP)
            self.say(f"The device's SSH target did not answer: {_one_line(exc)}")
            return None
        self.data_stream = stream
        if not self.device.target_host_key:
            line = host_key_line(conn)
            if line:
                await self.ctx.db(lambda s: rows.pin_host_key(s, self.device.id, line))
        return conn

    def _start_recording(self, session_id: str) -> Recording | None:
        s = self.ctx.settings.relay
        if not s.recordings:
            return None
        width, height = self.process.term_size[:2]
        try:
            return Recording.create(
                self.ctx.settings.data_dir,
                session_id,
                width=width or 80,
                height=height or 24,
                term=self.process.term_type or "",
                title=f"{self.identity.username}@{self.device.id}",
                options=RecordingOptions(s.record_input, s.recording_max_bytes),
            )
        except OSError as exc:
            log.warning("recording unavailable session=%s error=%s", session_id, exc)
            return None

    async def _first_end(
        self, ended: Awaitable[object], session_id: str, technician_left: Awaitable[None]
    ) -> str:
        """Wait for the device side to end, a close request, or the technician to leave."""
        watch = asyncio.ensure_future(self._watch(session_id))
        tasks = {
            "exit": asyncio.ensure_future(ended),
            "closed by request": watch,
            "technician left": asyncio.ensure_future(technician_left),
        }
        try:
            done, _ = await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        if watch in done and not watch.cancelled() and watch.exception() is None:
            return watch.result()  # "closed by <who>"
        return next(name for name, task in tasks.items() if task in done)

    async def _bridge(
        self,
        conn: asyncssh.SSHClientConnection,
        session_id: str,
        remote_command: str,
        recording: Recording | None,
    ) -> Outcome:
        tech = self.process
        bridge = Bridge(
            tech,
            self.traffic,
            on_output=recording.output if recording else None,
            on_resize=recording.resize if recording else None,
            on_input=recording.input if recording and recording.records_input else None,
        )
        try:
            await bridge.start(conn, remote_command or None)
            reason = await self._first_end(bridge.wait(), session_id, tech.channel.wait_closed())
        finally:
            bridge.detach()
        return _outcome(reason, bridge)

    async def _watch(self, session_id: str) -> str:
        """Return who asked to close this session, when asked; keep last_activity_at fresh."""
        loop = asyncio.get_running_loop()
        written = loop.time()
        while True:
            woken = await self.ctx.hub.wait(f"session:{session_id}", WATCH_INTERVAL)
            now = loop.time()
            if woken or now - written >= ACTIVITY_INTERVAL:
                active = self.traffic.last_activity > written
                traffic = self.traffic if active else None
                closed = await rows.poll(self.ctx, session_id, traffic)
                if closed is not None:
                    return closed
                written = now

    @contextlib.asynccontextmanager
    async def _ends_if_revoked(self) -> AsyncIterator[None]:
        """A dial-back data connection ends when its device is revoked or disabled, as a local
        one does with its tunnel (the device itself ends it with its tunnel on the other node)."""
        stream = self.data_stream
        if stream is None:
            yield
            return

        async def watch() -> None:
            device_id = self.device.id
            with self.ctx.hub.watch(f"device:{device_id}") as woken:
                # every status change wakes `device:<id>` (core.feed): the long wait is a net
                while not await self.ctx.db(lambda s: rows.device_revoked(s, device_id)):
                    if self.ctx.hub.closing:
                        return  # shutting down: every session ends anyway
                    await woken.wait(ACTIVITY_INTERVAL)
            log.info("dial-back session device=%s ends: the device was revoked", device_id)
            stream.close()

        task = asyncio.ensure_future(watch())
        try:
            yield
        finally:
            task.cancel()


def _way(peer: bool, data: bool) -> str:
    """The session row's path: data, tunnel (this node), dial-back, peering (another node)."""
    if peer:
        return "dial-back" if data else "peering"
    return "data" if data else "tunnel"


@contextlib.asynccontextmanager
async def _ends_with(tunnel: DeviceTunnel | None, stream: DataStream | None) -> AsyncIterator[None]:
    """A data connection ends with its device's tunnel (close DEVICE, revocation, loss) and
    counts against the tunnel's channel cap while it runs."""
    if stream is None or tunnel is None:
        yield
        return
    watch = asyncio.ensure_future(tunnel.closed.wait())
    watch.add_done_callback(lambda t: None if t.cancelled() else stream.close())
    tunnel.data_sessions += 1  # counts against the tunnel's channel cap
    try:
        yield
    finally:
        tunnel.data_sessions -= 1
        watch.cancel()


def _outcome(reason: str, bridge: Bridge) -> Outcome:
    if reason != "exit":
        return Outcome(None, None, reason)
    if bridge.exit_signal is not None:
        return Outcome(None, bridge.exit_signal, f"signal {bridge.exit_signal}")
    if bridge.exit_status is None or bridge.exit_status < 0:
        return Outcome(None, None, "connection to the device lost")
    return Outcome(bridge.exit_status, None, f"exit {bridge.exit_status}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
