"""Drain this node: take no new tunnels, move idle devices, let sessions finish, then be empty.

`rly relay drain NODE` marks the node's row `draining` with a deadline and
publishes `node:<name>`; this watcher wakes on that (or at its next look) and
then, every STEP seconds until the node is empty:
- new device connections are refused before any SSH work (ctx.draining);
- each device whose tunnel here carries no live session (of this node, or of
  another riding it by peering or dial-back) is asked, through
  the tracker, to `reconnect`: its tunnel here drops and it dials the next
  relay on its list (placement no longer lists this node);
- at the deadline, live sessions are closed with a message naming the drain,
  and their devices move on the next step.
`rly relay resume NODE` (or a restart) makes the node live again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from sqlalchemy import and_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import audit, session_close
from core.devices import request_tunnel
from core.models import Device, RelayNode, SshSession, Tunnel, utcnow
from relay.context import RelayContext

log = logging.getLogger(__name__)
STEP = 1.0
IDLE_LOOK = 5.0  # safety net when the drain event was missed
DRAIN_ACTOR = "relay drain"


@dataclass(frozen=True)
class DrainState:
    draining: bool
    deadline: datetime | None


def read_state(session: Session, node: str) -> DrainState:
    row = session.get(RelayNode, node)
    if row is None or row.state != "draining":
        return DrainState(False, None)
    return DrainState(True, row.drain_deadline)


def drain_step(
    session: Session, *, node: str, tunnelled: set[str], moved: set[str], now: datetime,
    deadline: datetime | None,
) -> tuple[list[str], int]:  # fmt: skip
    """Move idle devices, end sessions past the deadline; return (moved now, live sessions).

    Live sessions are this node's and those of other nodes riding a tunnel here
    (peering, dial-back): a device with either is busy and stays until the deadline.
    """
    columns = (
        SshSession.id,
        SshSession.device_id,
        SshSession.account_id,
        SshSession.close_requested,
    )
    open_rows = select(*columns).where(SshSession.ended_at.is_(None))
    here = open_rows.where(SshSession.relay_node == node)
    riding = open_rows.join(
        Tunnel,
        and_(
            Tunnel.device_id == SshSession.device_id,
            Tunnel.relay_node == node,
            Tunnel.closed_at.is_(None),
        ),
    ).where(SshSession.relay_node != node)
    live = list(session.execute(here)) + list(session.execute(riding))
    if deadline is not None and now >= deadline:
        for session_id, _device, account_id, asked in live:
            if asked:
                continue
            session_close.request_close(
                session, session_id=session_id, account_id=account_id, actor=DRAIN_ACTOR,
                via=f"{node} deadline",
            )  # fmt: skip
    busy = {row.device_id for row in live}
    now_moved = []
    for device_id in sorted(tunnelled - busy - moved):
        device = session.get(Device, device_id)
        if device is None:
            continue
        request_tunnel(session, device, "reconnect")
        audit.record(
            session,
            action="relay.drain_move",
            actor=node,
            account_id=device.account_id,
            target=device_id,
            detail="asked to reconnect to its next relay",
        )
        now_moved.append(device_id)
    return now_moved, len(live)


async def run_drain_watch(ctx: RelayContext) -> None:
    """Forever: follow this node's drain state and do the drain's work while it lasts."""
    woken = asyncio.Event()
    unsubscribe = ctx.hub.subscribe(f"node:{ctx.node_name}", woken.set)
    moved: set[str] = set()
    reported_empty = False
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), STEP if ctx.draining else IDLE_LOOK)
            woken.clear()
            try:
                state = await ctx.db(lambda s: read_state(s, ctx.node_name))
                if not state.draining:
                    if ctx.draining:
                        log.info("drain ended: node %s takes tunnels again", ctx.node_name)
                    ctx.draining, reported_empty = False, False
                    moved.clear()
                    continue
                if not ctx.draining:
                    log.info("draining node %s (deadline %s)", ctx.node_name, state.deadline)
                ctx.draining = True
                tunnelled = {t.device_id for t in ctx.tunnels}
                step = partial(
                    drain_step, node=ctx.node_name, tunnelled=tunnelled, moved=set(moved),
                    now=utcnow(), deadline=state.deadline,
                )  # fmt: skip
                now_moved, live = await ctx.db(step)
            except SQLAlchemyError as exc:
                log.warning("drain: database error %s", type(exc).__name__)
                continue
            moved.update(now_moved)
            for device_id in now_moved:
                ctx.hub.notify(f"device:{device_id}")
            empty = not tunnelled and live == 0
            if empty and not reported_empty:
                log.info("drain complete: node %s holds no tunnel and no session", ctx.node_name)
            reported_empty = empty
    finally:
        unsubscribe()
