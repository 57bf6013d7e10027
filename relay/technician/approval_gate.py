"""The approval step of a technician connection: create it, show it, wait for the decision.

The gate is shared by the menu (URL printed on the terminal) and by
keyboard-interactive authentication (URL shown as a prompt-less challenge), so
it never writes to a channel itself: callers format what `Pending` holds.
Waiting wakes on the hub topic `approval:<id>` (the portal notifies it, the
change feed carries other processes' decisions) and otherwise reads the row
once per second, which is also when the time-left line is redrawn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from core import approval_cache
from core.approvals import acting_user, close_pending, create_approval
from core.metrics import inc
from core.models import Approval, User
from relay.context import RelayContext

log = logging.getLogger(__name__)
TICK = 1.0


@dataclass(frozen=True)
class Identity:
    """The portal user who approved the session: the session acts as them."""

    user_id: int
    username: str
    account_id: int
    account_name: str
    approval_id: int


@dataclass(frozen=True)
class Pending:
    approval_id: int
    url: str
    code: str
    ttl: float


@dataclass(frozen=True)
class Decision:
    status: str  # approved | rejected | expired | abandoned
    identity: Identity | None = None
    remembered_until: datetime | None = None  # let in by a remembered approval (the cache)


def _identity(user: User, approval_id: int) -> Identity:
    return Identity(user.id, user.username, user.account_id, user.account.name, approval_id)


def format_left(seconds: float) -> str:
    seconds = max(int(seconds + 0.999), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"


class ApprovalGate:
    """One approval for one SSH connection."""

    def __init__(
        self,
        ctx: RelayContext,
        *,
        login: str,
        required_user_id: int | None,
        client_ip: str,
        client_version: str,
        key_fingerprint: str | None = None,
    ) -> None:
        self.ctx = ctx
        self.login = login
        self.required_user_id = required_user_id
        self.client_ip = client_ip
        self.client_version = client_version
        self.key_fingerprint = key_fingerprint  # the key of a key login (the cache is per key)
        self.pending: Pending | None = None

    async def create(self) -> Pending:
        ttl = self.ctx.settings.relay.approval_ttl

        def run(session: Session) -> tuple[int, str, str]:
            approval, token = create_approval(
                session,
                ssh_login=self.login,
                required_user_id=self.required_user_id,
                client_ip=self.client_ip,
                client_version=self.client_version,
                relay_node=self.ctx.node_name,
                ttl=ttl,
                key_fingerprint=self.key_fingerprint,
            )
            return approval.id, approval.code, token

        insert = asyncio.ensure_future(self.ctx.db(run))
        base = self.ctx.settings.http.public_url.rstrip("/")
        try:
            approval_id, code, token = await asyncio.shield(insert)
        except asyncio.CancelledError:  # the client left mid-insert: the row must not stay pending
            approval_id, code, token = await insert
            self.pending = Pending(approval_id, "", code, ttl)
            await self.abandon()
            raise
        self.pending = Pending(approval_id, f"{base}/approve/{token}", code, ttl)
        log.info(
            "approval requested id=%d login=%s from=%s", approval_id, self.login, self.client_ip
        )
        return self.pending

    async def _check(self, approval_id: int) -> Decision | None:
        def run(session: Session) -> Decision | None:
            approval = session.get(Approval, approval_id)
            if approval is None:
                return Decision("abandoned")
            if approval.status == "pending":
                return None
            if approval.status != "approved" or approval.decided_by is None:
                return Decision(approval.status)
            user = acting_user(session, approval)  # a key login acts as the key's owner
            if user is None or user.disabled:
                return Decision("rejected")
            self._remember(session, approval, user)
            return Decision("approved", _identity(user, approval_id))

        return await self.ctx.db(run)

    def _remember(self, session: Session, approval: Approval, user: User) -> None:
        """With `relay.approval_cache` on, a key login's approval is remembered for a while."""
        ttl = self.ctx.settings.relay.approval_cache
        if ttl > 0 and self.key_fingerprint and approval.required_user_id == user.id:
            approval_cache.remember(
                session, approval=approval, user=user, key_fingerprint=self.key_fingerprint, ttl=ttl
            )

    async def remembered(self) -> Decision | None:
        """An approval from the cache for this key, user and address, if one is live."""
        user_id, fingerprint = self.required_user_id, self.key_fingerprint
        if self.ctx.settings.relay.approval_cache <= 0 or user_id is None or not fingerprint:
            return None

        def run(session: Session) -> Decision | None:
            grant = approval_cache.find(
                session, user_id=user_id, key_fingerprint=fingerprint, client_ip=self.client_ip
            )
            user = session.get(User, user_id)
            if grant is None or user is None or user.disabled:
                return None
            approval = approval_cache.use(
                session,
                grant=grant,
                client_version=self.client_version,
                relay_node=self.ctx.node_name,
            )
            if approval is None:  # revoked a moment ago: ask as usual
                return None
            return Decision(
                "approved", _identity(user, approval.id), remembered_until=grant.expires_at
            )

        decision = await self.ctx.db(run)
        if decision is not None:
            log.info("approval from cache login=%s from=%s", self.login, self.client_ip)
        return decision

    async def wait(self, tick: Callable[[float], None] | None = None) -> Decision:
        """Wait for the decision; on expiry mark the row expired. Cancel-safe: abandons it."""
        assert self.pending is not None, "create() first"
        pending = self.pending
        loop = asyncio.get_running_loop()
        deadline = loop.time() + pending.ttl
        woken = self.ctx.hub.watch(f"approval:{pending.approval_id}")  # kept across the reads
        try:
            while True:
                decision = await self._check(pending.approval_id)
                if decision is not None:
                    return decision
                left = deadline - loop.time()
                if left <= 0:
                    if await self._close("expired"):
                        return Decision("expired")
                    continue  # decided at the last moment: read it
                if tick is not None:
                    tick(left)
                await woken.wait(min(TICK, left))
        except asyncio.CancelledError:
            await asyncio.shield(self.abandon())
            raise
        finally:
            woken.close()

    async def abandon(self) -> None:
        """The SSH side left before a decision."""
        if self.pending is not None:
            await self._close("abandoned")

    async def _close(self, status: str) -> bool:
        assert self.pending is not None
        approval_id = self.pending.approval_id

        def run(session: Session) -> bool:
            return close_pending(session, approval_id=approval_id, status=status, actor=self.login)

        changed = await self.ctx.db(run)
        if changed:
            log.info("approval %s id=%d", status, approval_id)
            inc("rly_approvals_total", outcome=status)  # expired / abandoned: decided here
        return changed
