"""The `stack` fixture: one relay with an account, ready for real devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.stack import Stack
from tests.support.procs import ProcessFactory
from tests.support.rly_server import RlyFactory
from tests.support.sshd import SshdFactory


@pytest.fixture
def stack(
    rly_factory: RlyFactory,
    process_factory: ProcessFactory,
    sshd_factory: SshdFactory,
    tmp_path: Path,
) -> Stack:
    """`rly serve` with account acme; devices and targets are stopped by their factories."""
    server = rly_factory(config={"relay": {"keepalive_interval": "2s", "keepalive_count": 2}})
    return Stack(server, process_factory, sshd_factory, tmp_path)
