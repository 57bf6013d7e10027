"""Fixtures for the adversarial tests: one `rly serve` and its database per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adversarial.support import Stack
from tests.support.rly_server import RlyFactory


@pytest.fixture
def stack(rly_factory: RlyFactory) -> Iterator[Stack]:
    """A running `rly serve` (default settings) and an admin view of its database."""
    built = Stack(rly_factory())
    try:
        yield built
    finally:
        built.close()
