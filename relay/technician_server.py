"""The technician port's SSH hooks: who may log in, and nothing else allowed.

Two logins: the shared gate user with the (non-secret) gate password, by
password or keyboard-interactive, and a portal user with one of their
registered public keys (then only that user may approve). Deny by default:
no port forwarding of any kind, no agent, no X11, before or after approval;
each refusal is audited. Pre-auth limits come from relay.preauth.

The one exception is ProxyJump / `ssh -W` to `DEVICE:22` on an approved
connection (relay.jump); the gate user's keyboard-interactive login shows the
approval URL before the session starts (relay.kbdint_approval), so a client
without a shell gets it too. Sessions and jump channels share one cap.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import asyncssh
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit, metrics
from core.models import User, UserKey
from relay.approval_gate import ApprovalGate, Pending
from relay.context import RelayContext
from relay.jump import JumpRequests
from relay.kbdint_approval import (
    EXTRA_INFO_KEY,
    ConnectionApproval,
    KbdintApproval,
    KbdintChallenge,
    disconnect_soon,
)
from relay.menu import DISCONNECT_GRACE, LoginInfo, MenuSession
from relay.preauth import PreauthLimiter, RefusalLog

log = logging.getLogger(__name__)


class TechnicianServer(asyncssh.SSHServer):
    def __init__(
        self,
        ctx: RelayContext,
        limiter: PreauthLimiter,
        handler: Callable[[asyncssh.SSHServerProcess[str]], Awaitable[None]],
    ) -> None:
        self.ctx = ctx
        self.limiter = limiter
        self.handler = handler
        self.open_sessions = 0
        self.cap_audited = False
        self.conn: asyncssh.SSHServerConnection | None = None
        self.client_ip = ""
        self.counted = False
        self.required_user_id: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.approval = ConnectionApproval()
        self.kbdint = KbdintApproval(self._check_gate, self._start_approval)
        self.jumps: JumpRequests | None = None

    # -- connection life -----------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.client_ip = str(peer[0]) if peer else ""
        conn.set_extra_info(**{EXTRA_INFO_KEY: self.approval})
        self.jumps = JumpRequests(self.ctx, conn, self.approval, self.client_ip, self._refused)
        if not self.limiter.admit(self.client_ip):  # the limiter logs refusals
            conn.abort()
            return
        self.counted = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if self.approval.shared is not None:  # the client left: a pending request is abandoned
            self._spawn(self.approval.abandon())

    def _release(self) -> None:
        if self.counted:
            self.counted = False
            self.limiter.release(self.client_ip)

    def auth_completed(self) -> None:
        self._release()
        assert self.conn is not None
        username = str(self.conn.get_extra_info("username"))
        version = str(self.conn.get_extra_info("client_version") or "")
        info = LoginInfo(username, self.required_user_id, self.client_ip, version)
        self.conn.set_extra_info(rly_login=info)
        method = "publickey" if self.required_user_id is not None else "gate password"
        self._audit("technician.login", username, f"ok method={method} client={version[:100]}")
        metrics.inc("rly_logins_total", port="technician", result="ok")

    # -- authentication --------------------------------------------------------

    @property
    def _gate_enabled(self) -> bool:
        return bool(self.ctx.settings.relay.gate_password)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return self._gate_enabled

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._check_gate(username, password)

    def kbdint_auth_supported(self) -> bool:
        return self._gate_enabled

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> KbdintChallenge:
        return self.kbdint.challenge()

    async def validate_kbdint_response(
        self, username: str, responses: Sequence[str]
    ) -> KbdintChallenge:
        """Gate password, then a prompt-less round showing the approval (relay.kbdint_approval)."""
        return await self.kbdint.respond(username, list(responses))

    async def _start_approval(self, username: str) -> Pending:
        """The connection's approval request, created during keyboard-interactive login."""
        assert self.conn is not None
        version = str(self.conn.get_extra_info("client_version") or "")
        gate = ApprovalGate(
            self.ctx,
            login=username,
            required_user_id=None,
            client_ip=self.client_ip,
            client_version=version,
        )
        shared = await self.approval.start_shared(gate)
        shared.task.add_done_callback(self._approval_decided)
        return await shared.create()

    def _approval_decided(self, task: asyncio.Task[Any]) -> None:
        """Rejected or expired: end the connection even if nothing on it is waiting."""
        if task.cancelled() or task.exception() is not None or self.conn is None:
            return
        if task.result().status != "approved":
            disconnect_soon(self.conn, f"rly: approval {task.result().status}", DISCONNECT_GRACE)

    async def _check_gate(self, username: str, password: str) -> bool:
        s = self.ctx.settings.relay
        ok = self._gate_enabled and hmac.compare_digest(
            f"{username}\0{password}".encode(), f"{s.gate_user}\0{s.gate_password}".encode()
        )
        if not ok:
            await self._failed(username, "gate password")
        return ok

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        fingerprint = key.get_fingerprint()

        def run(session: Session) -> int | None:
            return session.scalar(
                select(User.id)
                .join(UserKey, UserKey.user_id == User.id)
                .where(UserKey.fingerprint == fingerprint, User.username == username)
                .where(User.disabled.is_(False))
            )

        user_id = await self.ctx.db(run)
        if user_id is None:
            return False  # clients offer several keys: a miss is not a failed login
        self.required_user_id = user_id
        return True

    async def _failed(self, username: str, method: str) -> None:
        delay = self.limiter.failure(self.client_ip)
        metrics.inc("rly_logins_total", port="technician", result="failed")
        self._audit("technician.login_failed", username, f"method={method} delay={delay:.2f}s")
        await asyncio.sleep(delay)

    # -- deny by default --------------------------------------------------------

    def session_requested(
        self,
    ) -> tuple[asyncssh.SSHServerChannel[str], asyncssh.SSHServerSession[str]] | bool:
        """A menu session, up to the per-connection channel cap (a flood is refused)."""
        if not self._take_channel("session"):
            return False

        async def run(process: asyncssh.SSHServerProcess[str]) -> None:
            try:
                await self.handler(process)
            finally:
                self.open_sessions -= 1

        assert self.conn is not None
        channel: Any = self.conn.create_server_channel()
        # asyncssh refuses agent and X11 itself (both off in the listen options) but offers
        # no hook to see it; answering these two channel requests here makes them audited.
        channel._process_x11_req_request = lambda _packet: self._refuse_channel_request("x11")
        channel._process_auth_agent_req_at_openssh_dot_com_request = lambda _packet: (
            self._refuse_channel_request("agent forwarding")
        )
        return channel, asyncssh.SSHServerProcess(run, None, 3, False)

    def _refuse_channel_request(self, what: str) -> bool:
        self._refused(what)
        return False

    def _take_channel(self, kind: str) -> bool:
        cap = self.ctx.settings.relay.max_channels_per_connection
        if self.open_sessions >= cap:
            if not self.cap_audited:  # one audit row per connection, not one per flood packet
                self.cap_audited = True
                self._refused(f"{kind} beyond the cap of {cap} channels")
            return False
        self.open_sessions += 1
        return True

    def _release_channel(self) -> None:
        self.open_sessions -= 1

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]] | bool:
        """ProxyJump to a device (relay.jump), held until the approval; all else is refused."""
        if self.jumps is None or not self._take_channel("direct-tcpip"):
            return False
        return self.jumps.request(dest_host, dest_port, self._release_channel)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._refused(f"tcpip-forward on {listen_host[:100]}:{listen_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refused("direct-streamlocal")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refused("streamlocal-forward")
        return False

    def _refused(self, what: str) -> None:
        username = str(self.conn.get_extra_info("username") or "") if self.conn else ""
        log.info("technician request refused what=%s from=%s", what, self.client_ip)
        metrics.inc("rly_refused_requests_total", port="technician")
        self._audit("technician.refused_request", username, what)

    def _audit(self, action: str, actor: str, detail: str) -> None:
        def run(session: Session) -> None:
            audit.record(
                session, action=action, actor=actor[:64], detail=detail, source_ip=self.client_ip
            )

        self._spawn(self.ctx.db(run))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("technician audit write failed: %s", type(task.exception()).__name__)


def make_technician_server(
    ctx: RelayContext,
) -> tuple[Callable[[], asyncssh.SSHServer], dict[str, object]]:
    """The server factory and the listen() options of the technician port."""
    s = ctx.settings.relay
    refusals = RefusalLog(log, "technician")
    limiter = PreauthLimiter(
        s.max_unauthenticated, s.max_unauthenticated_per_source, refusals=refusals
    )

    handler = MenuSession.factory(ctx)

    def factory() -> asyncssh.SSHServer:
        return TechnicianServer(ctx, limiter, handler)

    extra: dict[str, object] = {
        "encoding": "utf-8",
        "errors": "surrogateescape",  # device bytes survive the text channel unchanged
        "line_editor": True,
        "line_history": 200,
        "max_line_length": 4096,
    }
    return factory, extra
