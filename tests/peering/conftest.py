"""The peering tests reuse the fleet's module fixtures: one PostgreSQL, relay-a and relay-b."""

from tests.fleet.conftest import fleet, fleet_db

__all__ = ["fleet", "fleet_db"]
