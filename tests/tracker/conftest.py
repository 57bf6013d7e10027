"""A tracker app over a fresh SQLite data dir per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tracker.harness import TrackerEnv


@pytest.fixture
def env(tmp_path: Path) -> Iterator[TrackerEnv]:
    """The root HTTP app with only the tracker mounted, on SQLite in tmp_path."""
    tracker_env = TrackerEnv.create(tmp_path / "data")
    try:
        yield tracker_env
    finally:
        tracker_env.close()
