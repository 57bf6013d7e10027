"""One PostgreSQL database and one fleet of real processes per test module.

`fleet`: `rly serve --only tracker,portal` plus two relays (relay-a on
127.0.1.1, relay-b on 127.0.1.2) with fast heartbeats, sharing the CA keys.
Modules extend it (a third relay, devices) and everything stops at the end.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import psycopg
import pytest

from tests.fleet.support import Fleet
from tests.support.pg import fresh_database

RELAY_CONFIG = {"relay": {"keepalive_interval": "2s", "keepalive_count": 2}}


@pytest.fixture(scope="module")
def fleet_db() -> Iterator[str]:
    """A fresh PostgreSQL database for this module (skip, or fail in CI, if unreachable)."""
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(fresh_database())
        except psycopg.OperationalError as exc:
            message = f"PostgreSQL is unreachable: {str(exc).strip()}"
            if os.environ.get("RLY_TEST_REQUIRE_POSTGRES") == "1":
                pytest.fail(message)
            pytest.skip(message)
        yield url


@pytest.fixture(scope="module")
def fleet(fleet_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Tracker+portal and relays relay-a (127.0.1.1) and relay-b (127.0.1.2) on one database."""
    fleet = Fleet(tmp_path_factory.mktemp("fleet"), fleet_db)
    fleet.relay_config = RELAY_CONFIG
    try:
        fleet.add_relay("relay-a", "127.0.1.1")
        fleet.add_relay("relay-b", "127.0.1.2")
        yield fleet
    finally:
        fleet.stop()
