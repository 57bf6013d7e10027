"""Placeholder: the device port refuses every login until the device issue lands."""

from __future__ import annotations

from collections.abc import Callable

import asyncssh

from relay.context import RelayContext


class DenyAllServer(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return False


def make_device_server(ctx: RelayContext) -> Callable[[], asyncssh.SSHServer]:
    return DenyAllServer
