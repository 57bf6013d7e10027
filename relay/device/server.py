"""The relay's device port: a device logs in with its key and holds one remote forward.

Deny by default: only public-key login as an accepted device from an allowed
address, and only one `tcpip-forward`. Sessions, exec, direct-tcpip, other
forwards, agent and X11 are refused and audited. The forward binds no socket:
`server_requested` returns a `DeviceListener`, and technician channels are
opened back over the device's connection through `relay.device.tunnels.DeviceTunnel`.

asyncssh verifies the signature after `validate_public_key` returns True, so
that hook only compares the key; the status/allowlist decision is taken in
`auth_completed`, i.e. only for a device that proved it holds the key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import asyncssh
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import audit, metrics
from core.data_wire import data_capable
from core.models import utcnow
from core.validate import strip_controls
from relay.context import RelayContext
from relay.device.auth import (
    DeviceView,
    drop_reason,
    key_matches,
    load_device,
    refusal,
    valid_device_id,
)
from relay.device.liveness import ensure_sweeper, keepalive_options, recheck_device
from relay.device.transport_label import tunnel_transport
from relay.device.tunnels import DeviceTunnel, close_tunnel_row, insert_tunnel_row
from relay.preauth import PreauthLimiter, RefusalLog

log = logging.getLogger(__name__)

# What a device asking for port 0 (`ssh -R 0:...`) is told it got. No socket is
# bound; the device only needs a non-zero number to match our channel opens.
SYNTHETIC_PORT = 1
REFUSAL_MESSAGES = {
    "pending": "device is pending approval",
    "revoked": "device is revoked",
    "address not allowed": "address not allowed for this device",
}


class DeviceListener(asyncssh.SSHListener):
    """The device's one remote forward, held without a socket."""

    def __init__(self, port: int, on_close: Callable[[], None]) -> None:
        super().__init__()
        self._port = port
        self._on_close: Callable[[], None] | None = on_close

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        """Called by asyncssh on cancel-tcpip-forward and when the connection ends."""
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    async def wait_closed(self) -> None:
        return None


class DeviceServer(asyncssh.SSHServer):
    """One device connection: authenticate, hold the forward, watch for revocation."""

    def __init__(self, ctx: RelayContext, limiter: PreauthLimiter) -> None:
        self._ctx = ctx
        self._limiter = limiter
        self._counted = False  # holds a place among the unauthenticated connections
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer_ip = ""
        self._peer_port = 0
        self._view: DeviceView | None = None  # the key matched (signature not yet checked)
        self._mismatch: DeviceView | None = None  # a known device offered with a wrong key
        self._device: DeviceView | None = None  # authenticated, accepted and allowed
        self._authed_at = utcnow()
        self._tunnel: DeviceTunnel | None = None
        self._forwarding = False
        self._unwatch: Callable[[], None] | None = None
        self._rechecking = False
        self._recheck_again = False
        self._refused = 0
        self._reason: str | None = None
        self._lost = False
        self._audits: list[Callable[[Session], None]] | None = None  # queued while one is written

    # -- connection and authentication ----------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        # asyncssh rebuilds the connection's options at the first userauth request
        # to apply `Match` blocks of an sshd-style config file. The relay passes
        # no config file, so that only makes a per-connection copy of the
        # listener's options (host key pairs included): a few KiB per idle
        # tunnel for identical values. Keep the listener's shared options.
        conn.reload_config = _keep_listener_options  # type: ignore[method-assign]
        peer = conn.get_extra_info("peername") or ("", 0)
        self._peer_ip, self._peer_port = str(peer[0]), int(peer[1])
        if self._ctx.draining or not self._limiter.admit(self._peer_ip):  # drain; limiter logs
            conn.abort()
            return
        self._counted = True

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self._limiter.release(self._peer_ip)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """True only if `key` is the device's stored key; asyncssh then checks the signature."""
        if not valid_device_id(username):
            return False
        view = self._view if self._view is not None and self._view.id == username else None
        if view is None:
            try:
                view = await self._ctx.db(lambda s: load_device(s, username))
            except SQLAlchemyError as exc:
                log.warning("device login %s: database error %s", username, type(exc).__name__)
                return False
        if view is None:
            log.info("device login refused: unknown device %s from %s", username, self._peer_ip)
            return False
        if not key_matches(view, key):
            self._mismatch = view
            return False
        self._view = view
        return True

    def auth_completed(self) -> None:
        """The device proved its key: decide from its status and address (no await: no race)."""
        self._release()
        view = self._view
        assert view is not None  # auth succeeds only through validate_public_key
        self._authed_at = utcnow()
        reason = refusal(view, self._peer_ip)
        if reason is not None:
            log.info("device login refused device=%s reason=%s", view.id, reason)
            self._audit("device.refused", view, reason)
            self._drop(REFUSAL_MESSAGES.get(reason, f"device {reason}"))
            return
        self._device = view
        # Here, not in connection_made: asyncssh reloads the listen options at the first
        # userauth request, which would undo it.
        assert self._conn is not None
        self._conn.set_keepalive(*keepalive_options(self._ctx.settings.relay))
        self._unwatch = self._ctx.hub.subscribe(f"device:{view.id}", self._device_changed)

    def _device_changed(self) -> None:
        """Hub callback: re-read the device once (coalescing bursts of wake-ups)."""
        if self._device is None or self._lost:
            return
        self._recheck_again = True
        if self._rechecking:
            return  # the running recheck reads the device once more when it is done
        self._rechecking = True
        device_id = self._device.id

        async def recheck() -> None:
            try:
                while self._recheck_again and not self._lost:
                    self._recheck_again = False
                    await recheck_device(
                        self._ctx, device_id, self._peer_ip, self._authed_at, self._drop
                    )
            finally:
                self._rechecking = False

        self._spawn(recheck(), f"device-recheck-{device_id}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self._lost = True
        if self._unwatch is not None:
            self._unwatch()
        tunnel = self._tunnel
        if tunnel is not None:
            self._ctx.tunnels.remove(tunnel)
            tunnel.closed.set()
            reason = tunnel.close_reason or self._reason or describe(exc)
            log.info("tunnel down device=%s reason=%s", tunnel.device_id, reason)
            self._spawn(self._tunnel_down(tunnel, reason), f"tunnel-down-{tunnel.device_id}")
        elif self._device is None and self._view is None and self._mismatch is not None:
            self._audit("device.refused", self._mismatch, "key mismatch")

    # -- requests: one remote forward, nothing else ----------------------------------

    def server_requested(
        self, listen_host: str, listen_port: int
    ) -> Coroutine[Any, Any, asyncssh.SSHListener | bool] | bool:
        if self._device is None or self._lost:
            return False
        if self._forwarding:
            self._refuse(f"second forward {strip_controls(listen_host)[:64]}:{listen_port}")
            return False
        self._forwarding = True
        return self._open_tunnel(self._device, listen_host, listen_port)

    def session_requested(self) -> bool:
        self._refuse("session")
        return False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        self._refuse(f"direct-tcpip {strip_controls(dest_host)[:64]}:{dest_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refuse("direct-streamlocal")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refuse("streamlocal-forward")
        return False

    def tun_requested(self, unit: int | None) -> bool:
        self._refuse("tun")
        return False

    # -- the tunnel ----------------------------------------------------------------

    async def _open_tunnel(
        self, view: DeviceView, listen_host: str, listen_port: int
    ) -> asyncssh.SSHListener | bool:
        conn = self._conn
        assert conn is not None
        s = self._ctx.settings.relay
        local = conn.get_extra_info("sockname") or ("", 0)
        tunnel = DeviceTunnel(
            device_id=view.id,
            conn=conn,
            listen_host=listen_host,
            listen_port=listen_port or SYNTHETIC_PORT,
            peer_ip=self._peer_ip,
            peer_port=self._peer_port,
            connected_at=utcnow(),
            client_version=str(conn.get_extra_info("client_version") or ""),
            account_id=view.account_id,
            transport_port=int(local[1]),
            max_channels=s.max_channels_per_connection,
        )
        tunnel.transport = tunnel_transport(
            conn.get_extra_info("rly_transport"), tunnel.client_version
        )
        tunnel.data_capable = data_capable(tunnel.client_version)
        try:
            row_id, reason = await self._ctx.db(lambda s: self._insert(s, tunnel))
        except SQLAlchemyError as exc:
            log.warning("tunnel up %s: database error %s", view.id, type(exc).__name__)
            self._forwarding = False
            return False
        if reason is not None:
            self._drop(reason)
            return False
        tunnel.row_id = row_id
        if self._lost:  # the device went away while the row was written
            reason = self._reason or "device disconnected"
            self._spawn(self._tunnel_down(tunnel, reason), f"tunnel-down-{view.id}")
            return False
        self._register(tunnel)
        return DeviceListener(tunnel.listen_port, self._forward_closed)

    def _insert(self, session: Session, tunnel: DeviceTunnel) -> tuple[int | None, str | None]:
        """Re-check the device in the same transaction that records the tunnel."""
        reason = drop_reason(load_device(session, tunnel.device_id), self._peer_ip, self._authed_at)
        if reason is not None:
            return None, reason
        return insert_tunnel_row(session, tunnel, self._ctx.node_name), None

    def _register(self, tunnel: DeviceTunnel) -> None:
        metrics.inc("rly_tunnels_opened_total")
        self._tunnel = tunnel
        old = self._ctx.tunnels.add(tunnel)
        if old is not None and old is not tunnel:
            old.close("replaced by a new tunnel")
        ensure_sweeper(self._ctx)
        self._ctx.hub.notify(f"tunnel:{tunnel.device_id}")
        log.info(
            "tunnel up device=%s peer=%s:%d port=%d transport=%s",
            tunnel.device_id,
            tunnel.peer_ip,
            tunnel.peer_port,
            tunnel.transport_port,
            tunnel.transport,
        )

    def _forward_closed(self) -> None:
        # asyncssh closes listeners before it calls connection_lost; look again
        # once that has run, and drop the device only for a cancel-tcpip-forward.
        asyncio.get_running_loop().call_soon(self._after_forward_closed)

    def _after_forward_closed(self) -> None:
        if not self._lost:
            self._drop("forward cancelled")

    async def _tunnel_down(self, tunnel: DeviceTunnel, reason: str) -> None:
        try:
            await self._ctx.db(lambda s: close_tunnel_row(s, tunnel, reason))
        except SQLAlchemyError as exc:
            log.warning("tunnel down %s: database error %s", tunnel.device_id, type(exc).__name__)
        self._ctx.hub.notify(f"tunnel:{tunnel.device_id}")

    # -- helpers ------------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        """Disconnect this device connection, remembering why."""
        if self._reason is None:
            self._reason = reason
        if self._tunnel is not None:
            self._tunnel.close(reason)
        elif self._conn is not None and not self._lost:
            self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)

    def _refuse(self, request: str) -> None:
        """Audit a refused request; a device that keeps asking is disconnected."""
        view = self._device or self._view
        log.info("device request refused device=%s request=%s", view.id if view else "-", request)
        self._refused += 1
        metrics.inc("rly_refused_requests_total", port="device")
        if self._refused <= self._ctx.settings.relay.max_channels_per_connection:
            self._audit("device.refused_request", view, request)
        else:
            self._drop("too many refused requests")

    def _audit(self, action: str, view: DeviceView | None, detail: str) -> None:
        device_id = view.id if view is not None else ""
        account_id = view.account_id if view is not None else None

        def write(session: Session) -> None:
            audit.record(
                session,
                action=action,
                actor=f"device:{device_id}",
                account_id=account_id,
                target=device_id,
                detail=detail,
                source_ip=self._peer_ip,
            )

        # One writer per connection, in order: concurrent writes on the database
        # thread pool could commit (and number) a connection's events out of order.
        if self._audits is not None:
            self._audits.append(write)
            return
        self._audits = [write]
        self._spawn(self._write_audits(), f"audit-{action}")

    async def _write_audits(self) -> None:
        while self._audits:
            fn = self._audits.pop(0)
            try:
                await self._ctx.db(fn)
            except SQLAlchemyError as exc:
                log.warning("device audit write failed: %s", type(exc).__name__)
        self._audits = None

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        self._ctx.tunnels.spawn(coro, name)


async def _keep_listener_options() -> None:
    return None


def describe(exc: Exception | None) -> str:
    """A short close reason for the tunnel row."""
    if exc is None:
        return "device disconnected"
    if isinstance(exc, asyncssh.DisconnectError):
        if "keepalive" in exc.reason:
            return "keepalive timeout"
        return f"device disconnected: {strip_controls(exc.reason)[:80]}"
    return f"connection lost: {type(exc).__name__}"


def device_limiter(ctx: RelayContext) -> PreauthLimiter:
    """One device port's pre-auth limits (shared by its tunnels and data connections)."""
    s = ctx.settings.relay
    refusals = RefusalLog(log, "device")
    return PreauthLimiter(
        s.max_unauthenticated, s.max_unauthenticated_per_source, refusals=refusals
    )


def make_device_server(
    ctx: RelayContext, limiter: PreauthLimiter
) -> Callable[[], asyncssh.SSHServer]:
    """The server factory for one device port."""
    return lambda: DeviceServer(ctx, limiter)
