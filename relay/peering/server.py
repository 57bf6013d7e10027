"""The peering port: node-authenticated SSH whose only grant is a channel to one local device.

A peer logs in as its node name with a user certificate from the relay host CA
whose principal is that name (core.keys.NodeIdentity), and only if the name is
a registered, not-gone row of relay_nodes; no other key, no password, no
keyboard-interactive. After login the one request granted is a `direct-tcpip`
open to `device:<id>` port 0 for a device whose tunnel is on THIS node: the
channel is spliced to a channel opened through that tunnel exactly as the
in-tunnel session path opens one (DeviceTunnel.create_connection), with
asyncssh's own forwarder moving the bytes. Everything else is refused and
audited as `peering.refused_request`; a refused login as `peering.refused_login`.
Unauthenticated connections count against the relay's pre-auth caps
(`relay.max_unauthenticated`, `..._per_source`), as on the technician port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import asyncssh
from asyncssh.forward import SSHForwarder  # public module; the class asyncssh's own -J uses
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import audit
from core.keys import NodeIdentity
from core.models import RelayNode
from core.validate import DEVICE_ID_RE, NAME_RE
from relay.context import RelayContext
from relay.device.tunnels import DeviceTunnel
from relay.peering.pool import PEER_PACKET, PEER_WINDOW
from relay.preauth import PreauthLimiter, RefusalLog
from relay.ssh_options import algorithm_options

log = logging.getLogger(__name__)
DEVICE_PREFIX = "device:"
NO_KEY = "no key offered"
# asyncssh types its session factories as SSHTCPSession; its forwarder is one (duck-typed)
FORWARDER = cast(Callable[[], asyncssh.SSHTCPSession[Any]], SSHForwarder)


def is_registered_node(session: Session, name: str) -> bool:
    """A node row that has not been declared gone."""
    found = session.scalar(
        select(RelayNode.name).where(RelayNode.name == name, RelayNode.gone_at.is_(None))
    )
    return found is not None


class PeeringServer(asyncssh.SSHServer):
    """One peer node's connection: deny by default, then allow the device channel."""

    def __init__(self, ctx: RelayContext, limiter: PreauthLimiter) -> None:
        self.ctx = ctx
        self.limiter = limiter
        self._counted = False
        self.peer_ip = ""
        self.username = ""
        self.node: str | None = None  # set once the node certificate was accepted
        self.refusal = NO_KEY  # the first reason found wins (clients retry a cert's bare key)
        self._authenticated = False

    # --- login -----------------------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.peer_ip = str(peer[0])
        if not self.limiter.admit(self.peer_ip):  # the technician port's pre-auth caps
            conn.abort()
            return
        self._counted = True

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.limiter.release(self.peer_ip)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if not self._authenticated and self.username:
            self._audit("peering.refused_login", f"user={self.username[:64]}: {self.refusal}")

    async def begin_auth(self, username: str) -> bool:
        """Called again if the client switches user names: each name is checked afresh."""
        self.username, self.node = username, None
        if not NAME_RE.fullmatch(username):
            self._refused("not a node name")
            return True
        try:
            registered = await self.ctx.db(lambda s: is_registered_node(s, username))
        except SQLAlchemyError:
            self._refused("the node registry is unavailable")
            return True
        if registered:
            self.node = username
        else:
            self._refused("not a registered relay node")
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._refused("key is not certified by the relay host CA")
        return False

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Only the host CA, only for a registered node logging in as itself."""
        if key.public_data != self.ctx.keys.host_ca.public_data:
            self._refused("certificate is not from the relay host CA")
            return False
        if self.node is None or username != self.node:
            return False  # refusal already says why (begin_auth)
        self._refused("certificate principal is not the node name, or it expired")
        return True

    def _refused(self, why: str) -> None:
        if self.refusal == NO_KEY:
            self.refusal = why

    def auth_completed(self) -> None:
        self._authenticated = True
        self._release()
        self.node = str(self._conn.get_extra_info("username"))  # the name that authenticated
        log.info("peering login node=%s from=%s", self.node, self.peer_ip)

    # --- requests ----------------------------------------------------------------------------
    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        if not dest_host.startswith(DEVICE_PREFIX) or dest_port != 0:
            return self._refuse(f"direct-tcpip to {dest_host[:80]!r} port {dest_port}")
        device_id = dest_host[len(DEVICE_PREFIX) :]
        if not DEVICE_ID_RE.fullmatch(device_id):
            return self._refuse(f"device channel to malformed id {device_id[:40]!r}")
        tunnel = self.ctx.tunnels.get(device_id)
        if tunnel is None or tunnel.closed.is_set():
            return self._refuse(f"device channel to {device_id}: its tunnel is not on this node")
        log.info("peering channel node=%s device=%s", self.node, device_id)
        return self._splice(tunnel, device_id)

    async def _splice(self, tunnel: DeviceTunnel, device_id: str) -> SSHForwarder:
        """Open the device channel through its tunnel and pair it with the peer's channel."""
        try:
            _chan, device_side = await tunnel.create_connection(FORWARDER, "", 0)
        except asyncssh.ChannelOpenError as exc:
            log.info("peering channel device=%s failed: %s", device_id, exc.reason)
            raise
        return SSHForwarder(cast(SSHForwarder, device_side))  # as asyncssh's own -J does

    def session_requested(self) -> bool:
        return self._refuse("session channel")

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return self._refuse(f"remote forward {listen_host[:80]!r} port {listen_port}")

    def unix_connection_requested(self, dest_path: str) -> bool:
        return self._refuse(f"unix socket {dest_path[:80]!r}")

    def unix_server_requested(self, listen_path: str) -> bool:
        return self._refuse(f"unix listener {listen_path[:80]!r}")

    def tun_requested(self, unit: int | None) -> bool:
        return self._refuse("tun forward")

    def tap_requested(self, unit: int | None) -> bool:
        return self._refuse("tap forward")

    def _refuse(self, what: str) -> bool:
        log.warning("peering refused node=%s request=%s", self.node, what)
        self._audit("peering.refused_request", what)
        return False

    def _audit(self, action: str, detail: str) -> None:
        actor = f"node:{self.node or self.username[:64] or '?'}"

        def run(session: Session) -> None:
            audit.record(
                session,
                action=action,
                actor=actor,
                target=self.ctx.node_name,
                detail=detail,
                source_ip=self.peer_ip,
            )

        self.ctx.tunnels.spawn(self.ctx.db(run), name="peering-audit")


async def listen_peering(
    ctx: RelayContext, identity: NodeIdentity, host: str, port: int
) -> asyncssh.SSHAcceptor:
    """The peering acceptor: the node's host certificate, publickey only, no scp or agent."""
    s = ctx.settings.relay
    limiter = PreauthLimiter(
        s.max_unauthenticated, s.max_unauthenticated_per_source, refusals=RefusalLog(log, "peering")
    )
    return await asyncssh.listen(
        host,
        port,
        server_factory=lambda: PeeringServer(ctx, limiter),
        server_host_keys=[(identity.key, identity.host_cert)],
        reuse_address=True,
        login_timeout=s.login_grace,
        keepalive_interval=s.keepalive_interval,
        keepalive_count_max=s.keepalive_count,
        window=PEER_WINDOW,
        max_pktsize=PEER_PACKET,
        password_auth=False,
        kbdint_auth=False,
        agent_forwarding=False,
        x11_forwarding=False,
        allow_scp=False,
        **algorithm_options(),
    )
