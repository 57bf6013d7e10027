"""A's side of peering: one SSH connection per peer node, reused, redialed when lost.

The connection logs in as this node's name with its node client certificate
and accepts only a host certificate from the relay host CA whose principal is
the node it meant to reach (`host_key_alias`), so an address taken over by
another host, or another node answering at a stale address, is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncssh

from core.keys import NodeIdentity
from core.validate import is_ascii_digits
from relay.ssh_options import algorithm_options

log = logging.getLogger(__name__)
DIAL_TIMEOUT = 5.0
# Both ends are asyncssh: channel packets large enough that one inner SSH packet (32 KiB plus
# its framing) crosses the peering hop as one packet, not two; asyncssh raises its receive
# limit to match.
PEER_WINDOW = 8 * 1024 * 1024
PEER_PACKET = 256 * 1024

AddressLookup = Callable[[str], Awaitable[str | None]]


class PeerUnavailable(asyncssh.ChannelOpenError):
    """The peer node has no peering address or cannot be reached."""

    def __init__(self, node: str, why: str) -> None:
        super().__init__(asyncssh.OPEN_CONNECT_FAILED, f"relay {node} cannot be reached: {why}")


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError if malformed."""
    host, _, port = address.rpartition(":")
    if not host or not is_ascii_digits(port):
        raise ValueError(f"not host:port: {address!r}")
    return host.strip("[]"), int(port)


class PeerPool:
    """node name -> live SSH client connection to its peering port."""

    def __init__(
        self,
        *,
        node_name: str,
        identity: NodeIdentity,
        host_ca: asyncssh.SSHKey,
        lookup: AddressLookup,
        keepalive_interval: float,
        keepalive_count: int,
    ) -> None:
        self.node_name = node_name
        self._identity = identity
        # a public-only key: asyncssh compares trusted CA keys with the signer's public key
        self._host_ca = asyncssh.import_public_key(host_ca.export_public_key())
        self._lookup = lookup
        self._keepalive = (keepalive_interval, keepalive_count)
        self._conns: dict[str, asyncssh.SSHClientConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def connection(self, node: str) -> asyncssh.SSHClientConnection:
        """The pooled connection to `node`, dialing it if there is none or it was lost."""
        conn = self._conns.get(node)
        if conn is not None and not conn.is_closed():
            return conn
        async with self._locks.setdefault(node, asyncio.Lock()):
            conn = self._conns.get(node)
            if conn is not None and not conn.is_closed():
                return conn
            conn = await self._dial(node)
            self._conns[node] = conn
            return conn

    async def _dial(self, node: str) -> asyncssh.SSHClientConnection:
        address = await self._lookup(node)
        if not address:
            raise PeerUnavailable(node, "it has no peering address")
        try:
            host, port = split_address(address)
        except ValueError:
            raise PeerUnavailable(node, "its peering address is malformed") from None
        interval, count = self._keepalive
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    host,
                    port,
                    host_key_alias=node,  # the host certificate must name the node we meant
                    known_hosts=([], [self._host_ca], []),
                    username=self.node_name,
                    client_keys=[(self._identity.key, self._identity.client_cert)],
                    agent_path=None,
                    agent_forwarding=False,
                    x11_forwarding=False,
                    preferred_auth="publickey",
                    config=None,
                    keepalive_interval=interval,
                    keepalive_count_max=count,
                    window=PEER_WINDOW,
                    max_pktsize=PEER_PACKET,
                    **algorithm_options(),
                ),
                DIAL_TIMEOUT,
            )
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            raise PeerUnavailable(node, str(exc).strip() or type(exc).__name__) from None
        log.info("peering connected to node=%s at %s", node, address)
        return conn

    async def open_device(
        self, node: str, device_id: str, factory: Callable[[], Any]
    ) -> tuple[Any, Any]:
        """A channel to `device_id` through `node`; redial once if the pooled connection died."""
        for attempt in (1, 2):
            conn = await self.connection(node)
            try:
                return await conn.create_connection(
                    factory, f"device:{device_id}", 0, window=PEER_WINDOW, max_pktsize=PEER_PACKET
                )
            except (asyncssh.ConnectionLost, asyncssh.DisconnectError, BrokenPipeError):
                self._drop(node, conn)
                if attempt == 2:
                    raise PeerUnavailable(node, "the peering connection was lost") from None
        raise AssertionError("unreachable")

    def _drop(self, node: str, conn: asyncssh.SSHClientConnection) -> None:
        if self._conns.get(node) is conn:
            del self._conns[node]
        conn.close()

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                conn.close()
        self._conns.clear()


class PeerCarrier:
    """What a device session's SSH rides when the device is on another node (bridge.Carrier)."""

    def __init__(self, pool: PeerPool, node: str, device_id: str) -> None:
        self.pool = pool
        self.node = node
        self.device_id = device_id

    async def create_connection(
        self, session_factory: Callable[[], Any], remote_host: str, remote_port: int
    ) -> tuple[Any, Any]:
        """Open the device channel at the peer (the host/port asyncssh passes are ignored)."""
        return await self.pool.open_device(self.node, self.device_id, session_factory)
