"""Reconnect backoff: exponential with full jitter, 1 s base, 60 s cap."""

from __future__ import annotations

import random

import pytest

from device_client.tunnel import BACKOFF_CAP_ENV, Backoff, backoff_cap_from_env


def test_ceilings_double_up_to_the_cap() -> None:
    """The delay bound goes 1, 2, 4, ... and stops at 60 seconds."""
    backoff = Backoff(rng=random.Random(1))
    ceilings = []
    for _ in range(9):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_delays_are_jittered_within_the_ceiling() -> None:
    """Each delay is uniform in [0, ceiling], so many devices do not reconnect in step."""
    backoff = Backoff(rng=random.Random(7))
    delays = []
    for _ in range(200):
        ceiling = backoff.ceiling()
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling
        delays.append(delay)
    late = delays[10:]
    assert max(late) > 45
    assert min(late) < 15


def test_reset_starts_again_from_the_base() -> None:
    """After a stable tunnel the next failure waits at most the 1 s base again."""
    backoff = Backoff(rng=random.Random(3))
    for _ in range(10):
        backoff.next_delay()
    backoff.reset()
    assert backoff.ceiling() == 1
    assert backoff.next_delay() <= 1


def test_huge_attempt_counts_do_not_overflow() -> None:
    """A device failing for days keeps a 60 s ceiling instead of overflowing."""
    backoff = Backoff(attempt=10_000)
    assert backoff.ceiling() == 60


def test_env_lowers_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """RLY_CLIENT_BACKOFF_CAP lowers the cap but can never raise it above 60 s."""
    monkeypatch.delenv(BACKOFF_CAP_ENV, raising=False)
    assert backoff_cap_from_env() == 60
    monkeypatch.setenv(BACKOFF_CAP_ENV, "0.5")
    assert backoff_cap_from_env() == 0.5
    monkeypatch.setenv(BACKOFF_CAP_ENV, "600")
    assert backoff_cap_from_env() == 60


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_env_cap_must_be_positive(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A non-positive or non-numeric cap is refused with the variable's name."""
    monkeypatch.setenv(BACKOFF_CAP_ENV, value)
    with pytest.raises(ValueError, match=BACKOFF_CAP_ENV):
        backoff_cap_from_env()


def test_first_retry_after_a_drop_spreads_over_the_whole_cap() -> None:
    """After an established tunnel drops, the first retry spreads over the cap (at most 40 s)."""
    delays = [Backoff(cap=20.0, rng=random.Random(seed)).after_drop() for seed in range(2000)]
    assert max(delays) <= 20.0
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(20)]
    assert max(per_second) <= 0.1 * len(delays)
    assert min(per_second) > 0  # late seconds are used too, not only the first few
