"""Devices end to end: real rly serve, real rly-client, real sshd targets."""

from __future__ import annotations

import re
import socket
import time

from tests.e2e.stack import Stack, wait_for


def device_list(stack: Stack) -> str:
    return stack.server.run_cli("device", "list", check=True).stdout


def test_enrolled_device_is_pending_until_accepted(stack: Stack) -> None:
    """A plain-token device is pending (with fingerprint) until accepted, then comes online."""
    device = stack.enroll_device(auto_accept=False)
    device.start()
    listing = device_list(stack)
    row = next(line for line in listing.splitlines() if line.startswith(device.id))
    assert "pending" in row
    assert stack.device_row(device.id).key_fingerprint in row
    time.sleep(1)
    assert stack.open_tunnel(device.id) is None  # a pending device gets no tunnel
    stack.server.run_cli("device", "accept", device.id, check=True)
    tunnel = stack.wait_online(device.id, timeout=10)
    assert tunnel.relay_node
    assert re.search(rf"^{device.id}\s+online", device_list(stack), re.M)


def test_auto_accept_token_brings_the_device_online(stack: Stack) -> None:
    """An auto-accept token needs no admin step: the tunnel comes up on first run."""
    device = stack.enroll_device(hostname="nas-auto")
    device.start()
    tunnel = stack.wait_online(device.id)
    assert tunnel.peer_ip == "127.0.0.1"
    assert tunnel.transport_port == stack.server.device_ports[0]
    assert stack.device_row(device.id).last_checkin_at is not None


def test_client_falls_back_to_the_next_relay_port(stack: Stack) -> None:
    """With the first relay port closed, the client reaches the relay on the second."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    device = stack.enroll_device()
    device.edit_config(relay_ports=[closed_port, stack.server.device_ports[0]])
    device.start()
    tunnel = stack.wait_online(device.id)
    assert tunnel.transport_port == stack.server.device_ports[0]


def test_client_returns_after_relay_restart(stack: Stack) -> None:
    """After the relay restarts, the client is back within its backoff cap."""
    device = stack.enroll_device()
    device.start()
    first = stack.wait_online(device.id)
    stack.server.restart()
    restarted = time.monotonic()
    second = stack.wait_online(device.id, timeout=device.backoff_cap + 10)
    assert second.id != first.id
    assert time.monotonic() - restarted < device.backoff_cap + 10


def test_revoke_drops_the_tunnel_within_a_second(stack: Stack) -> None:
    """`rly device revoke` closes a live tunnel within one second, and it stays down."""
    device = stack.enroll_device()
    device.start()
    stack.wait_online(device.id)
    stack.server.run_cli("device", "revoke", device.id, check=True)
    revoked = time.monotonic()
    stack.wait_offline(device.id, timeout=3)
    assert time.monotonic() - revoked < 1.5  # CLI exit to tunnel row closed, polled
    time.sleep(device.backoff_cap + 1)
    assert stack.open_tunnel(device.id) is None


def test_allowlist_removal_drops_live_tunnels(stack: Stack) -> None:
    """Removing the allowlist entry a tunnel came in by drops it; it cannot come back."""
    stack.server.run_cli("allowlist", "add", "127.0.0.0/8", "--account", "acme", check=True)
    stack.server.run_cli("allowlist", "add", "10.0.0.0/8", "--account", "acme", check=True)
    device = stack.enroll_device()
    device.start()
    stack.wait_online(device.id)
    stack.server.run_cli("allowlist", "remove", "127.0.0.0/8", "--account", "acme", check=True)
    stack.wait_offline(device.id, timeout=3)
    time.sleep(device.backoff_cap + 1)
    assert stack.open_tunnel(device.id) is None


def test_client_status_reports_the_tunnel(stack: Stack) -> None:
    """`rly-client status` says the client runs and shows its tunnel and last check-in."""
    device = stack.enroll_device()
    device.start()
    stack.wait_online(device.id)

    def status_up() -> str | None:
        out = stack.processes(
            ["python", "-m", "device_client.cli", "status", "--config", str(device.config_path)],
            name="status",
        )
        out.wait(20)
        return out.stdout if "tunnel:        up" in out.stdout else None

    text = wait_for(status_up, 10, "status to show the tunnel up", step=0.5)
    assert f"device:        {device.id}" in text
    assert "last check-in: never" not in text
