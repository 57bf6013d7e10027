"""Dial-back's parts without a fleet: the event's shape, the hub's handler, the device's rule."""

from __future__ import annotations

import asyncio
import socket

import pytest

from core.hub import Hub
from device_client.data_dial import DialError, dial_data, parse_request
from relay.data.tickets import dial_request, new_ticket
from relay.peering import dial_back
from relay.peering.dial_back import dial_topic, parse_dial_topic


def test_dial_topic_round_trips_and_malformed_ones_are_ignored() -> None:
    topic = dial_topic("relay-b", "abcdefgh23", "sess234567", "relay-a")
    assert parse_dial_topic(topic) == ("relay-b", "abcdefgh23", "sess234567", "relay-a")
    for bad in (
        "dial:relay-b:abcdefgh23:sess234567",  # no requester
        "dial:relay-b:ABCDEFGH23:sess234567:relay-a",  # not a device id
        "dial:relay-b:abcdefgh23:sess/34567:relay-a",  # not a session id
        "dial:relay b:abcdefgh23:sess234567:relay-a",  # not a node name
        "dial:relay-b:abcdefgh23:sess234567:relay-a:extra",
        "dial-refused:sess234567",
    ):
        assert parse_dial_topic(bad) is None, bad


def test_hub_hands_whole_topics_of_a_kind_to_its_handler() -> None:
    hub = Hub()
    seen: list[str] = []
    woken: list[str] = []
    hub.handle("dial", seen.append)
    hub.subscribe("dial", lambda: woken.append("exact"))
    hub.notify("dial:relay-b:x")
    hub.notify("dialx:relay-b")  # another kind
    hub.notify("device:abc")
    assert seen == ["dial:relay-b:x"] and woken == []


def test_endpoints_only_is_a_boolean_or_the_request_is_ignored() -> None:
    base = dial_request(
        ticket=new_ticket(), session_id="sess234567", node="relay-a", endpoints=[("h", 1)]
    )
    plain = parse_request(base)
    assert plain is not None and not plain.endpoints_only
    only = dial_request(
        ticket=new_ticket(),
        session_id="sess234567",
        node="relay-a",
        endpoints=[("h", 1)],
        endpoints_only=True,
    )
    parsed = parse_request(only)
    assert parsed is not None and parsed.endpoints_only
    assert parse_request({**only, "endpoints_only": "yes"}) is None


def test_a_dial_back_request_never_tries_the_tunnels_own_endpoint() -> None:
    """With endpoints_only the device dials only the requesting node, not `also` (the node
    holding its tunnel, which would refuse a ticket bound to another node)."""
    tried: list[tuple[str, int]] = []

    async def connect(host: str, port: int) -> socket.socket:
        tried.append((host, port))
        raise ConnectionRefusedError(f"{host}:{port}")

    async def run(endpoints_only: bool) -> None:
        request = parse_request(
            dial_request(
                ticket=new_ticket(),
                session_id="sess234567",
                node="relay-a",
                endpoints=[("127.0.1.1", 2222)],
                endpoints_only=endpoints_only,
            )
        )
        assert request is not None
        with pytest.raises(DialError):
            await dial_data(request, (("127.0.1.2", 2222),), connect)

    asyncio.run(run(False))
    assert tried == [("127.0.1.1", 2222), ("127.0.1.2", 2222)]
    tried.clear()
    asyncio.run(run(True))
    assert tried == [("127.0.1.1", 2222)]


def test_remembered_failures_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory of devices that could not dial back never grows past MAX_REMEMBERED."""
    monkeypatch.setattr(dial_back, "MAX_REMEMBERED", 3)
    monkeypatch.setattr(dial_back, "_failed", {})
    for n in range(10):
        dial_back._remember_failure("relay-a", f"dev{n:07d}")
    assert list(dial_back._failed) == [("relay-a", f"dev{n:07d}") for n in (7, 8, 9)]
