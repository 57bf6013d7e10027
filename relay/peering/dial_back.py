"""Dial-back (issue 11): a device tunnelled at node B opens a session's data connection to A.

The technician is on A, the device's tunnel on B. A publishes one event on the
shared database, `dial:<B>:<device>:<session>:<A>` (core.events, NOTIFY). B,
if it holds that device's tunnel, makes the single-use ticket itself, bound to
node A and that session (relay.data.tickets), and sends the device the same
dial request a single-node session sends, with A's device endpoints read from
A's registry row; the device dials A's data port and A redeems the ticket as
it would its own. So no node carries another's bytes, the secret never
travels through the database, and an event forged by someone with database
access can only make a device dial a registered relay with a ticket nobody
waits for. When B cannot ask (no such tunnel, a plain `ssh -R` device, a full
tunnel, A unknown or draining) it answers `dial-refused:<session>` and A
stops waiting. One relay process per node name is assumed (the registry row
is the node's), so "no tunnel here" is a refusal, not someone else's turn.

B confirms with `dial-sent:<session>` once the device has the request; a
device that then did not dial in time (its network may reach only B) is
remembered for RETRY_AFTER, so its next sessions go to peering at once
instead of waiting again. A timeout with no word from B (B died, or runs
without LISTEN) is not held against the device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncssh
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.events import publish
from core.models import RelayNode
from core.validate import DEVICE_ID_RE, NAME_RE
from relay.context import RelayContext
from relay.data.accept import DataStream
from relay.data.request import endpoints
from relay.data.tickets import dial_request, new_ticket, store_ticket

log = logging.getLogger(__name__)
KIND = "dial"
REFUSED = "dial-refused"
SENT = "dial-sent"
RETRY_AFTER = 300.0  # seconds a device that could not dial back goes straight to peering
MAX_REMEMBERED = 100_000  # devices remembered at once (a bound on the memory it may take)
_failed: dict[tuple[str, str], float] = {}  # (node, device id) -> when it failed to dial back


def dial_topic(holder: str, device_id: str, session_id: str, requester: str) -> str:
    return f"{KIND}:{holder}:{device_id}:{session_id}:{requester}"


def parse_dial_topic(topic: str) -> tuple[str, str, str, str] | None:
    """(holder, device, session, requester) of a well-formed request, else None."""
    parts = topic.split(":")
    if len(parts) != 5 or parts[0] != KIND:
        return None
    _kind, holder, device_id, session_id, requester = parts
    names_ok = NAME_RE.fullmatch(holder) and NAME_RE.fullmatch(requester)
    ids_ok = DEVICE_ID_RE.fullmatch(device_id) and DEVICE_ID_RE.fullmatch(session_id)
    return (holder, device_id, session_id, requester) if names_ok and ids_ok else None


def dial_back_possible(ctx: RelayContext, device_id: str) -> bool:
    """Whether to try dial-back before peering for this device from this node."""
    if ctx.peers is None or ctx.settings.relay.data_connect_timeout <= 0 or not endpoints(ctx):
        return False  # single node (SQLite), data connections off, or nothing to dial
    failed = _failed.get((ctx.node_name, device_id))
    return failed is None or time.monotonic() - failed > RETRY_AFTER


def _remember_failure(node: str, device_id: str) -> None:
    now = time.monotonic()
    if len(_failed) >= MAX_REMEMBERED:  # forget the expired ones first, then the oldest
        for key in [k for k, at in _failed.items() if now - at > RETRY_AFTER]:
            del _failed[key]
        while len(_failed) >= MAX_REMEMBERED:
            del _failed[next(iter(_failed))]
    _failed[(node, device_id)] = now


async def request_dial_back(
    ctx: RelayContext, holder: str, device_id: str, session_id: str
) -> DataStream | None:
    """A's side: the session's data connection dialled back by the device, or None (peering)."""
    if not dial_back_possible(ctx, device_id):
        return None
    timeout = ctx.settings.relay.data_connect_timeout
    waiter = ctx.data.expect(session_id, device_id)
    refused, sent = asyncio.Event(), asyncio.Event()
    unsubscribe = (
        ctx.hub.subscribe(f"{REFUSED}:{session_id}", refused.set),
        ctx.hub.subscribe(f"{SENT}:{session_id}", sent.set),
    )
    topic = dial_topic(holder, device_id, session_id, ctx.node_name)
    refusal = asyncio.ensure_future(refused.wait())
    try:
        async with asyncio.timeout(timeout):
            await ctx.db(lambda s: publish(s, topic))
            await asyncio.wait((waiter.arrived, refusal), return_when=asyncio.FIRST_COMPLETED)
    except (TimeoutError, SQLAlchemyError) as exc:
        if not (waiter.arrived.done() and not waiter.arrived.cancelled()):
            if sent.is_set():  # B asked the device, which did not dial: it may reach only B
                _remember_failure(ctx.node_name, device_id)
            why = "the device did not dial" if sent.is_set() else f"no answer from {holder}"
            log.info("no dial-back device=%s session=%s (%s: %s); using peering",
                     device_id, session_id, type(exc).__name__, why)  # fmt: skip
    finally:
        refusal.cancel()
        for stop in unsubscribe:
            stop()
        ctx.data.forget(session_id)
    arrived = waiter.arrived
    if arrived.done() and not arrived.cancelled() and arrived.exception() is None:
        _failed.pop((ctx.node_name, device_id), None)
        stream: DataStream = arrived.result()
        return stream
    return None


def requester_endpoints(session: Session, node: str) -> list[tuple[str, int]]:
    """A live (not gone, not draining) node's device endpoints from its registry row."""
    row = session.scalar(
        select(RelayNode).where(
            RelayNode.name == node, RelayNode.gone_at.is_(None), RelayNode.state == "live"
        )
    )
    if row is None or not row.public_host:
        return []
    return [(row.public_host, port) for port in row.port_list]


def serve_dial_backs(ctx: RelayContext) -> None:
    """B's side: answer the dial-back requests addressed to this node (see module doc)."""

    def handle(topic: str) -> None:
        parsed = parse_dial_topic(topic)
        if parsed is None or parsed[0] != ctx.node_name:
            return  # another node's, our own request seen coming back, or malformed
        _holder, device_id, session_id, requester = parsed
        ctx.tunnels.spawn(forward(device_id, session_id, requester), name="dial-back")

    async def forward(device_id: str, session_id: str, requester: str) -> None:
        tunnel = ctx.tunnels.get(device_id)
        why = ""
        if tunnel is None or not tunnel.data_capable or tunnel.at_capacity:
            why = "no data-capable tunnel with room"
        ticket = new_ticket()

        def prepare(session: Session) -> list[tuple[str, int]]:
            """A's endpoints, and the ticket stored for A, in one transaction."""
            targets = requester_endpoints(session, requester)
            if targets:
                store_ticket(
                    session,
                    ticket=ticket,
                    device_id=device_id,
                    session_id=session_id,
                    node=requester,
                )
            return targets

        try:
            targets = [] if why else await ctx.db(prepare)
            if not why and not targets:
                why = f"relay {requester} is not a live node with device endpoints"
            if tunnel is not None and not why:
                request = dial_request(
                    ticket=ticket,
                    session_id=session_id,
                    node=requester,
                    endpoints=targets,
                    endpoints_only=True,
                )
                await tunnel.send_dial(request)
                log.info("dial-back device=%s session=%s to=%s", device_id, session_id, requester)
                with contextlib.suppress(SQLAlchemyError):  # A then knows a timeout is the device's
                    await ctx.db(lambda s: publish(s, f"{SENT}:{session_id}"))
                return
        except (OSError, SQLAlchemyError, asyncssh.Error, asyncssh.ChannelOpenError) as exc:
            why = type(exc).__name__
        log.info("dial-back refused device=%s session=%s to=%s: %s",
                 device_id, session_id, requester, why)  # fmt: skip
        with contextlib.suppress(SQLAlchemyError):  # else A gives up on its own timeout
            await ctx.db(lambda s: publish(s, f"{REFUSED}:{session_id}"))

    ctx.hub.handle(KIND, handle)
