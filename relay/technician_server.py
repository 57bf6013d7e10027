"""Placeholder: the technician port refuses every login until the technician issue lands."""

from __future__ import annotations

from collections.abc import Callable

import asyncssh

from relay.context import RelayContext
from relay.device_server import DenyAllServer


def make_technician_server(
    ctx: RelayContext,
) -> tuple[Callable[[], asyncssh.SSHServer], dict[str, object]]:
    return DenyAllServer, {}
