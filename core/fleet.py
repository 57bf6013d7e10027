"""What the relay node registry means, shared by the relays, the tracker and the CLI.

A node is *gone* once silent for GONE_AFTER of its own heartbeat intervals (or
once declared gone by a peer), *draining* after `rly relay drain` until it is
empty (*drained*), else *live*. Only live nodes take new tunnels.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from core.models import RelayNode

GONE_AFTER = 3  # heartbeats


def gone_after(interval: float) -> timedelta:
    """How long a node with this heartbeat interval may stay silent before it is gone."""
    return timedelta(seconds=GONE_AFTER * max(interval, 0.1))


def is_silent(node: RelayNode, now: datetime) -> bool:
    return now - node.last_seen_at > gone_after(node.heartbeat_interval)


def node_state(node: RelayNode, now: datetime, tunnels: int, sessions: int) -> str:
    """live, draining, drained (draining and empty) or gone."""
    if node.gone_at is not None or is_silent(node, now):
        return "gone"
    if node.state == "draining":
        return "drained" if tunnels == 0 and sessions == 0 else "draining"
    return "live"


def takes_tunnels(node: RelayNode, now: datetime) -> bool:
    """Whether placement may send devices to this node."""
    return node.state == "live" and node.gone_at is None and not is_silent(node, now)
