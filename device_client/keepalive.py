"""rly-client's SSH keepalive: a round trip per interval x count / 2, a dead relay in time.

asyncssh probes after `interval` of silence and drops the peer on the tick
after `count_max` unanswered probes, i.e. after interval x (count_max + 1).
Passing the configured (30 s, 3) straight through probed every 30 s and
noticed a dead relay only after 120 s. The relay (relay.device.liveness) probes a
device only after interval x count / 2 of silence; a device that probes a
little before that (EARLY) keeps the relay from ever probing, so each tunnel
costs the relay one small request and reply per round, and one round per
interval x count / 2 is the fewest that still finds a hung peer in time:
probe after P of silence, drop after 2P <= interval x count.
"""

from __future__ import annotations

EARLY = 0.9  # of the relay's silence threshold: margin for loop lag and round-trip time


def keepalive_options(interval: float, count: int) -> tuple[float, int]:
    """(keepalive_interval, keepalive_count_max) for asyncssh.connect from the config's pair."""
    if interval <= 0:
        return 0.0, 1
    return interval * max(1, count) / 2 * EARLY, 1
