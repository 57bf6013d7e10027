"""The technician port's SSH hooks: who may log in, and nothing else allowed.

Two logins: the shared gate user with the (non-secret) gate password, by
password or keyboard-interactive, and a portal user with one of their
registered public keys (then only that user may approve). Who logged in comes
only from the step that succeeded (AuthStep): every auth hook first forgets
the previous attempt, a new username forgets everything (begin_auth), and
`auth_completed` binds what the last, successful hook recorded. asyncssh
calls `validate_public_key` for an unsigned query and again for the signed
request and checks the signature only after it, so a registered key that is
merely offered binds nothing (Warpgate CVE-2023-48712 class). Deny by default:
no port forwarding of any kind, no agent, no X11, before or after approval;
each refusal is audited. Pre-auth limits come from relay.preauth.

The one exception is ProxyJump / `ssh -W` to `DEVICE:22` on an approved
connection (relay.technician.jump); the gate user's keyboard-interactive login shows the
approval URL before the session starts (relay.technician.kbdint_approval), so a client
without a shell gets it too. Sessions and jump channels share one cap.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit, metrics
from core.models import User, UserKey
from relay.context import RelayContext
from relay.preauth import PreauthLimiter, RefusalLog
from relay.technician.approval_gate import ApprovalGate, Pending
from relay.technician.jump import JumpRequests
from relay.technician.kbdint_approval import (
    EXTRA_INFO_KEY,
    ConnectionApproval,
    KbdintApproval,
    KbdintChallenge,
    disconnect_soon,
    shows_instructions,
)
from relay.technician.menu import DISCONNECT_GRACE, LoginInfo, MenuSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuthStep:
    """What one auth hook accepted: the method, the username, the portal user of a key."""

    method: str  # "password" | "keyboard-interactive" | "publickey"
    username: str
    user_id: int | None = None
    key_fingerprint: str | None = None  # the key that signed a publickey login


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
        self._step: AuthStep | None = None  # the last auth hook's acceptance, if it accepted
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
        """Bind the login to what the successful step recorded, for the username it was for."""
        self._release()
        assert self.conn is not None
        username = str(self.conn.get_extra_info("username"))
        step = self._step
        if step is None or step.username != username:  # no hook accepted this login: deny
            log.error("technician login without an accepting auth step from=%s", self.client_ip)
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, "rly: login refused")
            return
        version = str(self.conn.get_extra_info("client_version") or "")
        if step.method == "keyboard-interactive":
            self.approval.shown_at_login = self.kbdint.displayed and shows_instructions(version)
        else:
            self._forget_approval()  # a request an earlier kbdint attempt made is not this login's
        info = LoginInfo(
            username, step.user_id, self.client_ip, version, step.method, step.key_fingerprint
        )
        self.conn.set_extra_info(rly_login=info)
        self._audit("technician.login", username, f"ok method={step.method} client={version[:100]}")
        metrics.inc("rly_logins_total", port="technician", result="ok")

    def _forget_approval(self) -> None:
        """Drop the approval state of earlier attempts; a pending request is abandoned."""
        shared = self.approval.forget()
        if shared is not None:
            self._spawn(shared.abandon())

    # -- authentication --------------------------------------------------------

    @property
    def _gate_enabled(self) -> bool:
        return bool(self.ctx.settings.relay.gate_password)

    def begin_auth(self, username: str) -> bool:
        """A new username: nothing an attempt for another one established carries over."""
        self._step = None
        self.kbdint.reset()
        self._forget_approval()
        return True

    def password_auth_supported(self) -> bool:
        return self._gate_enabled

    async def validate_password(self, username: str, password: str) -> bool:
        self._step = None
        ok = await self._check_gate(username, password)
        if ok:
            self._step = AuthStep("password", username)
        return ok

    def kbdint_auth_supported(self) -> bool:
        return self._gate_enabled

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> KbdintChallenge:
        self._step = None
        return self.kbdint.challenge()

    async def validate_kbdint_response(
        self, username: str, responses: Sequence[str]
    ) -> KbdintChallenge:
        """Gate password, then a prompt-less round showing the approval.

        The rounds are relay.technician.kbdint_approval's.
        """
        self._step = None
        result = await self.kbdint.respond(username, list(responses))
        if result is True:
            self._step = AuthStep("keyboard-interactive", username)
        return result

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
        """A registered key of this portal user; binding waits for auth_completed (see above)."""
        self._step = None
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
        self._step = AuthStep("publickey", username, user_id, fingerprint)
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
        """ProxyJump to a device, held until the approval; all else is refused.

        The channel is served by relay.technician.jump.
        """
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
