"""Is a tunnel still alive, and may it stay: keepalive tuning, the watcher, the sweep.

- Keepalives: asyncssh drops a silent peer after interval x (count_max + 1)
  (the timer restarts on every received packet and the peer is dropped on the
  timer tick after count_max unanswered probes). `keepalive_options` maps the
  configured interval x count onto that as (interval x count / 2, 1): a
  blackholed tunnel still goes within interval x count, but the relay's own
  probe waits for half that much silence. Any packet from the device restarts
  the timer, so a device that sends its own keepalives at the configured
  interval (rly-client does, 30 s by default) keeps the relay from ever
  probing: the relay only answers, which halves its keepalive work per tunnel
  (no probe, no task, no reply to parse). The device's probes carry the
  detection, as SPEC allows. A device that stays silent (OpenSSH without
  ServerAliveInterval) is probed every interval x count / 2, i.e. no more
  often than configured when count >= 2.
- Kernel: `tcp_keepalive` sets TCP keepalives and TCP_USER_TIMEOUT on each
  tunnel's socket, so a peer whose host or network is gone (no ACKs) is
  dropped by the kernel within interval x count at no Python cost, and
  writes to it stop retrying long before the kernel's default ~15 minutes.
  A hung peer whose kernel still ACKs is the SSH probe's job, as above.
- Watcher: each connection subscribes a callback to the hub topic `device:<id>`
  (no task while idle) and re-reads the device only when woken (revoke,
  allowlist change, repair/close).
- Sweep: one task per process writes `last_keepalive_at` for all responsive
  tunnels of this node in one UPDATE per interval, not one write per probe.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from datetime import datetime

import asyncssh
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.config import RelaySettings
from core.models import Tunnel, utcnow
from relay.context import RelayContext
from relay.device.auth import drop_reason, load_device

log = logging.getLogger(__name__)

DEFAULT_SWEEP = 30.0
SWEEP_CHUNK = 500  # ids per UPDATE ... WHERE id IN (...): well under SQLite's variable limit


def keepalive_options(s: RelaySettings) -> tuple[float, int]:
    """(interval, count_max) for conn.set_keepalive so a dead peer goes within interval x count.

    One probe after interval x count / 2 of silence, dropped after as much
    again: the latest detection allowed, the fewest probes of our own.
    """
    interval, count = s.keepalive_interval, max(1, s.keepalive_count)
    if interval <= 0:
        return 0.0, 1
    return interval * count / 2, 1


def tcp_keepalive(sock: socket.socket, s: RelaySettings) -> None:
    """Kernel dead-peer detection on a tunnel socket: unACKed for interval x count, it goes.

    Idle probes start after interval x count / 2 and repeat count times over
    the other half; TCP_USER_TIMEOUT caps both those and unACKed data at
    interval x count. Not for data connections: a slow reader there is not dead.
    """
    if s.keepalive_interval <= 0 or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    count = max(1, s.keepalive_count)
    total = s.keepalive_interval * count
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(total / 2)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, int(total / 2 / count)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(total * 1000)))


def sweep_interval(s: RelaySettings) -> float:
    return s.keepalive_interval if s.keepalive_interval > 0 else DEFAULT_SWEEP


async def recheck_device(
    ctx: RelayContext,
    device_id: str,
    peer_ip: str,
    since: datetime,
    drop: Callable[[str], None],
) -> None:
    """Re-decide after a wake-up for this device; call drop(reason) if it must go."""
    try:
        view = await ctx.db(lambda s: load_device(s, device_id))
    except SQLAlchemyError as exc:
        log.warning("device watch %s: database error %s", device_id, type(exc).__name__)
        return
    reason = drop_reason(view, peer_ip, since)
    if reason is not None:
        log.info("dropping tunnel device=%s reason=%s", device_id, reason)
        drop(reason)


def responsive(conn: asyncssh.SSHServerConnection) -> bool:
    """No keepalive probe is outstanding (asyncssh keeps this count privately; 0 if absent)."""
    return int(getattr(conn, "_keepalive_count", 0)) == 0


def ensure_sweeper(ctx: RelayContext) -> None:
    """Start the per-process sweep if it is not running; it ends when no tunnel is left."""
    task = ctx.tunnels.sweeper
    if task is None or task.done():
        ctx.tunnels.sweeper = asyncio.get_running_loop().create_task(
            _sweep_loop(ctx), name="tunnel-liveness"
        )


async def _sweep_loop(ctx: RelayContext) -> None:
    interval = sweep_interval(ctx.settings.relay)
    while len(ctx.tunnels):
        await asyncio.sleep(interval)
        try:
            await sweep_once(ctx)
        except SQLAlchemyError as exc:
            log.warning("tunnel liveness sweep failed: %s", type(exc).__name__)


async def sweep_once(ctx: RelayContext) -> int:
    """Stamp last_keepalive_at on every responsive open tunnel of this node; return how many."""
    ids = [
        t.row_id
        for t in ctx.tunnels
        if t.row_id is not None and not t.closed.is_set() and responsive(t.conn)
    ]
    if ids:
        now = utcnow()
        await ctx.db(lambda s: _stamp(s, ids, now))
    return len(ids)


def _stamp(session: Session, ids: list[int], now: datetime) -> None:
    for i in range(0, len(ids), SWEEP_CHUNK):
        session.execute(
            update(Tunnel)
            .where(Tunnel.id.in_(ids[i : i + SWEEP_CHUNK]), Tunnel.closed_at.is_(None))
            .values(last_keepalive_at=now)
        )
