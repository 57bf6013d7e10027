"""ProxyJump / `ssh -W` through the technician port: which `direct-tcpip` opens are served.

Only `DEVICE:22`, where DEVICE is a device id, hostname or serial of the
approving user's account (relay.technician.device_lookup, same rules and words as the
menu), on a connection that is approved. Anything else (another port, an
arbitrary host, another account's device, an unapproved connection) is
refused with a one-line reason the client prints, and audited by the caller.

A connection whose keyboard-interactive login created an approval
(relay.technician.kbdint_approval) holds the channel open until the decision: approve
serves the channel with the nested server (relay.technician.jump_server); reject or
expiry refuses it and disconnects the whole connection at once, with the
reason. A password or public-key login has shown no URL before its session,
so a jump on it is refused until a shell on that connection was approved, or
(a key login) while a remembered approval for it is live (relay.approval_cache).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

import asyncssh

from relay.context import RelayContext
from relay.technician import device_lookup
from relay.technician.approval_gate import ApprovalGate, Identity
from relay.technician.jump_server import open_nested_server
from relay.technician.kbdint_approval import ConnectionApproval, disconnect_soon

log = logging.getLogger(__name__)
DEVICE_PORT = 22
MAX_NAME = 253
NOT_APPROVED = (
    "this login has no approval: jump as the gate user (keyboard-interactive shows the "
    "approval link), or approve a shell on this connection first"
)
OUTCOME_WORDS = {
    "rejected": "The request was rejected in the portal.",
    "expired": "The approval request expired.",
    "abandoned": "The approval request was withdrawn.",
}


class Refused(Exception):
    """A jump request the relay will not serve; str() is the one-line reason."""


def check_target(dest_host: str, dest_port: int) -> str | None:
    """Why (host, port) cannot name a device, or None. Checked before any approval wait."""
    if dest_port != DEVICE_PORT:
        return f"only port {DEVICE_PORT} of a device is reachable, not {dest_port}"
    if not dest_host or len(dest_host) > MAX_NAME or not dest_host.isprintable():
        return "not a device name"
    return None


class JumpRequests:
    """Serves the `direct-tcpip` requests of one technician connection."""

    def __init__(
        self,
        ctx: RelayContext,
        conn: asyncssh.SSHServerConnection,
        approval: ConnectionApproval,
        client_ip: str,
        refused: Callable[[str], None],
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.approval = approval
        self.client_ip = client_ip
        self.refused = refused
        self._watchers: set[asyncio.Future[None]] = set()

    def request(
        self, dest_host: str, dest_port: int, release: Callable[[], None]
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        """The awaitable session for asyncssh; `release` runs when refused or when it ends.

        asyncssh's SSH connection object is itself a valid channel session (it is
        what `asyncssh.listen(tunnel=...)` hands to its channels).
        """

        async def run() -> asyncssh.SSHTCPSession[bytes]:
            try:
                nested = await self.open(dest_host, dest_port)
            except BaseException:
                release()
                raise
            watcher = asyncio.ensure_future(nested.wait_closed())
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
            watcher.add_done_callback(lambda _t: release())
            return cast(asyncssh.SSHTCPSession[bytes], nested)

        return run()

    async def open(self, dest_host: str, dest_port: int) -> asyncssh.SSHServerConnection:
        """The session for the channel (a nested SSH server); ChannelOpenError if refused."""
        what = f"direct-tcpip to {dest_host[:100]}:{dest_port}"
        try:
            reason = check_target(dest_host, dest_port)
            if reason is not None:
                raise Refused(reason)
            identity = await self._identity()
            device = await self._device(identity, dest_host)
            log.info(
                "jump to device=%s user=%s from=%s", device.id, identity.username, self.client_ip
            )
            return await open_nested_server(
                self.ctx,
                identity=identity,
                device=device,
                requested=dest_host,
                client_ip=self.client_ip,
            )
        except Refused as exc:
            self.refused(f"{what}: {exc}")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, f"rly: {exc}"
            ) from None

    async def _identity(self) -> Identity:
        if self.approval.identity is not None:
            return self.approval.identity
        shared = self.approval.shared
        if shared is None:
            remembered = await self._remembered()
            if remembered is None:
                raise Refused(NOT_APPROVED)
            return remembered
        decision = await shared.wait()
        if decision.status == "approved" and decision.identity is not None:
            return decision.identity
        words = OUTCOME_WORDS.get(decision.status, f"The approval request was {decision.status}.")
        disconnect_soon(self.conn, f"rly: {words}")  # after the open failure is sent
        raise Refused(f"not approved ({decision.status})")

    async def _remembered(self) -> Identity | None:
        """A key login with a live remembered approval (relay.approval_cache) may jump."""
        login = self.conn.get_extra_info("rly_login")
        if login is None or not getattr(login, "key_fingerprint", None):
            return None
        gate = ApprovalGate(
            self.ctx,
            login=login.login,
            required_user_id=login.required_user_id,
            client_ip=self.client_ip,
            client_version=login.client_version,
            key_fingerprint=login.key_fingerprint,
        )
        decision = await gate.remembered()
        if decision is None or decision.identity is None:
            return None
        self.approval.identity = decision.identity  # the connection acts as them from now on
        return decision.identity

    async def _device(self, identity: Identity, name: str) -> device_lookup.DeviceInfo:
        min_version = self.ctx.settings.relay.min_client_version
        found = await self.ctx.db(
            lambda s: device_lookup.resolve(
                s, account_id=identity.account_id, name=name, min_client_version=min_version
            )
        )
        if isinstance(found, device_lookup.LookupFailure):
            raise Refused(found.one_line)
        return found
