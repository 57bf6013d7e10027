"""The run loop: what check-in replies do to the tunnel, and a clean SIGTERM exit."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from device_client.api import CheckinReply, TrackerClient
from device_client.runner import Runner, checkin_delay, run_client
from device_client.state import StateFile, read_state
from tests.device_client.test_tunnel import Keys, device_config, relay, until


def _reply(
    action: str = "none", status: str = "accepted", mode: str = "persistent"
) -> CheckinReply:
    return CheckinReply(
        status=status, action=action, tunnel_mode=mode, next_checkin=0, server_time=0
    )


def _runner(
    tmp_path: Path,
    mode: str,
    handler: Callable[[httpx.Request], object] | None = None,
    relay_port: int = 9,
    keys: Keys | None = None,
) -> Runner:
    keys = keys or Keys.make()
    config = replace(device_config(tmp_path, keys, relay_port), tunnel_mode=mode, idle_timeout=0.5)
    transport = httpx.MockTransport(handler or (lambda _r: httpx.Response(500)))  # type: ignore[arg-type]
    tracker = TrackerClient(
        "http://tracker.test", device_id="dev-1", key=keys.device, transport=transport
    )
    return Runner(
        config=config,
        key=keys.device,
        tracker=tracker,
        state=StateFile(config.state_file, tmp_path / "c.toml"),
        backoff_cap=0.2,
    )


@pytest.mark.parametrize(
    ("mode", "reply", "want"),
    [
        ("persistent", _reply(), True),
        ("persistent", _reply(status="pending"), False),
        ("on-demand", _reply(mode="on-demand"), False),
        ("on-demand", _reply("open", mode="on-demand"), True),
        ("on-demand", _reply("open", status="pending", mode="on-demand"), False),
        ("persistent", _reply(mode="on-demand"), False),  # the tracker's mode wins
    ],
)
def test_reply_decides_whether_a_tunnel_is_wanted(
    tmp_path: Path, mode: str, reply: CheckinReply, want: bool
) -> None:
    """Only accepted devices want a tunnel: always when persistent, on "open" when on-demand."""
    runner = _runner(tmp_path, mode)
    runner.want_up = False
    runner._apply(reply)
    assert runner.want_up is want


@pytest.mark.parametrize(("mode", "want"), [("persistent", True), ("on-demand", False)])
def test_close_drops_the_tunnel(tmp_path: Path, mode: str, want: bool) -> None:
    """ "close" drops the tunnel; a persistent device then reconnects, on-demand stays down."""
    runner = _runner(tmp_path, mode)
    runner.want_up = True
    runner._apply(_reply("close", mode=mode))
    assert runner._drop
    assert runner.want_up is want


def test_epoch_or_seconds_next_checkin() -> None:
    """next_checkin works both as seconds from now and as an epoch time, bounded to 5 min."""
    assert checkin_delay(replace(_reply(), next_checkin=3.0), now=1.7e9) == 3.0
    assert checkin_delay(replace(_reply(), next_checkin=1.7e9 + 4), now=1.7e9) == 4.0
    assert checkin_delay(replace(_reply(), next_checkin=1e6), now=1.7e9) == 300.0


def test_on_demand_opens_on_request_and_closes_when_idle(tmp_path: Path) -> None:
    """An "open" reply brings the tunnel up; with no channels it closes after idle_timeout."""
    calls: list[int] = []

    async def handler(_request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) > 1:
            await asyncio.sleep(0.3)
        action = "open" if len(calls) == 1 else "none"
        return httpx.Response(
            200,
            json={
                "status": "accepted",
                "action": action,
                "tunnel_mode": "on-demand",
                "next_checkin": 0,
                "server_time": 0,
            },
        )

    async def scenario() -> None:
        keys = Keys.make()
        async with relay(keys) as port:
            runner = _runner(tmp_path, "on-demand", handler, port, keys)
            stop = asyncio.Event()
            task = asyncio.create_task(runner.run(stop))
            states = await _watch(runner, until="down-after-up")
            stop.set()
            await task
        assert states[0] == "down"
        assert "up" in states  # "connecting" may be too brief to observe
        assert runner.want_up is False
        assert read_state(runner.config.state_file).tunnel_state == "down"  # type: ignore[union-attr]

    asyncio.run(scenario())


async def _watch(runner: Runner, until: str, timeout: float = 8.0) -> list[str]:
    """Record tunnel state changes until the tunnel went up and then down again."""
    states: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            current = runner.state.state.tunnel_state
            if not states or states[-1] != current:
                states.append(current)
            if until == "down-after-up" and "up" in states and current == "down":
                return states
            if until == "up" and current == "up":
                return states
            await asyncio.sleep(0.01)


def test_sigterm_exits_0_and_tunnel_survives_tracker_outage(tmp_path: Path) -> None:
    """A persistent tunnel comes up with the tracker down, and SIGTERM ends run with 0."""

    async def scenario() -> int:
        keys = Keys.make()
        async with relay(keys) as port:
            config = device_config(tmp_path, keys, port)
            config.key_file.write_bytes(keys.device.export_private_key())
            task = asyncio.create_task(run_client(config, tmp_path / "c.toml", 0.2))
            await until(
                lambda: getattr(read_state(config.state_file), "tunnel_state", None) == "up",
                timeout=8,
            )
            os.kill(os.getpid(), signal.SIGTERM)
            return await task

    assert asyncio.run(scenario()) == 0
    state = read_state(tmp_path / "state.json")
    assert state is not None
    assert state.stopped is not None
    assert state.tunnel_state == "down"
    assert state.checkin_result is not None
    assert state.checkin_result.startswith("error: tracker")


def test_client_acks_actions_and_ignores_repeats(tmp_path: Path) -> None:
    """The client echoes the last action_id as `ack`, acts once per id, and sends no ack to a
    tracker without acks."""
    runner = _runner(tmp_path, "persistent")
    assert "ack" not in runner._checkin_body(0)
    runner._apply(_reply())  # a tracker without acks: nothing to echo
    assert "ack" not in runner._checkin_body(0)
    runner._apply(replace(_reply(), action_id=0))
    assert runner._checkin_body(0)["ack"] == 0
    runner.want_up, runner._drop = False, False
    runner._apply(replace(_reply("close"), action_id=41))
    assert (runner._checkin_body(0)["ack"], runner._drop) == (41, True)
    runner.want_up, runner._drop = True, False
    runner._apply(replace(_reply("close"), action_id=41))  # sent again until acked: ignored
    assert (runner.want_up, runner._drop) == (True, False)
    runner._apply(replace(_reply("reconnect"), action_id=42))  # no tunnel: come back, no drop
    assert (runner._checkin_body(0)["ack"], runner.want_up, runner._drop) == (42, True, False)
