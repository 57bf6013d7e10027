"""The device port with the relay in this process, to reach `ctx.tunnels` directly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from core.config import HttpSettings, RelaySettings, Settings
from core.feed import run_feed
from core.hub import Hub
from relay.app import start_relay
from relay.context import RelayContext
from relay.device.liveness import keepalive_options, sweep_once
from rly.serve import prepare
from tests.relay.device_port_support import (
    Db,
    EchoServer,
    FreezableProxy,
    await_until,
    connect_device,
    new_key,
    write_key,
)


@contextlib.asynccontextmanager
async def running_relay(data_dir: Path, **relay: Any) -> AsyncIterator[RelayContext]:
    """The relay as `rly serve` starts it (prepare + start_relay + change feed), then stopped."""
    settings = Settings(
        data_dir=data_dir,
        relay=RelaySettings(listen="127.0.0.1", technician_port=0, device_ports=[0], **relay),
        http=HttpSettings(listen="127.0.0.1", port=0),
    )
    prepared = await asyncio.to_thread(prepare, settings)
    hub = Hub()
    hub.bind(asyncio.get_running_loop())
    ctx = RelayContext(
        settings=settings,
        sessions=prepared.sessions,
        keys=prepared.keys,
        hub=hub,
        node_name="test-node",
        public_host="127.0.0.1",
    )
    started = await start_relay(ctx)
    feed = asyncio.create_task(run_feed(prepared.sessions, hub))
    try:
        yield ctx
    finally:
        ctx.tunnels.close_all("relay stopping")
        await ctx.tunnels.drain()
        await started.close()
        feed.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feed
        prepared.engine.dispose()


class Collect(asyncssh.SSHTCPSession[bytes]):
    """Gathers what the far end sends on a channel."""

    def __init__(self) -> None:
        self.data = b""
        self.got = asyncio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.data += data
        self.got.set()


async def echo_through(ctx: RelayContext, device_id: str, payload: bytes) -> bytes:
    """Open a channel back through the device's tunnel and return what comes back."""
    tunnel = ctx.tunnels.get(device_id)
    assert tunnel is not None
    chan, session = await tunnel.create_connection(Collect, "ignored", 0)
    assert isinstance(session, Collect)
    chan.write(payload)
    while len(session.data) < len(payload):
        session.got.clear()
        await asyncio.wait_for(session.got.wait(), 5)
    chan.close()
    return session.data


def _host_ca(ctx: RelayContext) -> str:
    return ctx.keys.host_ca_public


def test_channel_through_asyncssh_device_reaches_its_target(tmp_path: Path) -> None:
    """A channel the relay opens through an asyncssh device's forward reaches its target."""

    async def scenario() -> None:
        async with running_relay(tmp_path / "data") as ctx:
            db = Db(ctx.settings.data_dir)
            echo = EchoServer()
            echo_port = await echo.start()
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            conn = await connect_device(ctx.device_ports[0], device_id, key, _host_ca(ctx))
            try:
                await conn.forward_remote_port("", 0, "127.0.0.1", echo_port)
                await await_until(lambda: ctx.tunnels.get(device_id))
                assert await echo_through(ctx, device_id, b"hello device") == b"hello device"
            finally:
                conn.close()
                echo.close()
                db.close()

    asyncio.run(scenario())


def test_channel_through_openssh_device_reaches_its_target(tmp_path: Path) -> None:
    """An OpenSSH `ssh -R 0:` device accepts the relay's channels on the synthetic port."""

    async def scenario() -> None:
        async with running_relay(tmp_path / "data") as ctx:
            db = Db(ctx.settings.data_dir)
            echo = EchoServer()
            echo_port = await echo.start()
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            key_path = write_key(key, tmp_path / "key")
            known = tmp_path / "known_hosts"
            known.write_text(f"@cert-authority * {_host_ca(ctx)}\n")
            ssh = await asyncio.create_subprocess_exec(
                "ssh", "-N", "-F", "/dev/null", "-R", f"0:127.0.0.1:{echo_port}",
                "-p", str(ctx.device_ports[0]), "-i", str(key_path),
                "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                f"{device_id}@127.0.0.1",
                stdin=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:
                await await_until(lambda: ctx.tunnels.get(device_id), timeout=10)
                assert await echo_through(ctx, device_id, b"x" * 100_000) == b"x" * 100_000
            finally:
                ssh.terminate()
                await ssh.wait()
                echo.close()
                db.close()

    asyncio.run(scenario())


def test_new_tunnel_replaces_the_old_one_of_the_same_device(tmp_path: Path) -> None:
    """A device's second connection takes over; the first is closed as replaced."""

    async def scenario() -> None:
        async with running_relay(tmp_path / "data") as ctx:
            db = Db(ctx.settings.data_dir)
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            port, ca = ctx.device_ports[0], _host_ca(ctx)
            first = await connect_device(port, device_id, key, ca)
            second = await connect_device(port, device_id, key, ca)
            try:
                await first.forward_remote_port("", 0, "127.0.0.1", 9)
                old = await await_until(lambda: ctx.tunnels.get(device_id))
                await second.forward_remote_port("", 0, "127.0.0.1", 9)
                await asyncio.wait_for(first.wait_closed(), 5)
                assert ctx.tunnels.get(device_id) not in (None, old)
                closed = await await_until(
                    lambda: [t for t in db.tunnels(device_id) if t.closed_at is not None]
                )
                assert closed[0].close_reason == "replaced by a new tunnel"
                assert len(db.open_tunnels(device_id)) == 1
            finally:
                first.close()
                second.close()
                db.close()

    asyncio.run(scenario())


def test_blackholed_tunnel_is_dropped_by_keepalive(tmp_path: Path) -> None:
    """A device that stops answering is dropped within keepalive interval x count.

    SPEC allows 2 s more; the bound here is tighter so that asyncssh's own
    interval x (count + 1) would fail it.
    """

    async def scenario() -> None:
        settings = {"keepalive_interval": 1.0, "keepalive_count": 2}
        async with running_relay(tmp_path / "data", **settings) as ctx:
            db = Db(ctx.settings.data_dir)
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            proxy = FreezableProxy(ctx.device_ports[0])
            conn = await connect_device(await proxy.start(), device_id, key, _host_ca(ctx))
            try:
                await conn.forward_remote_port("", 0, "127.0.0.1", 9)
                tunnel = await await_until(lambda: ctx.tunnels.get(device_id))
                proxy.freeze()
                loop = asyncio.get_running_loop()
                frozen_at = loop.time()
                await asyncio.wait_for(tunnel.closed.wait(), 10)
                assert loop.time() - frozen_at < 1.0 * 2 + 0.5
                closed = await await_until(
                    lambda: [t for t in db.tunnels(device_id) if t.closed_at is not None]
                )
                assert closed[0].close_reason == "keepalive timeout"
            finally:
                conn.abort()
                proxy.close()
                db.close()

    asyncio.run(scenario())


def test_channels_per_tunnel_are_capped(tmp_path: Path) -> None:
    """The relay opens at most max_channels_per_connection channels on one tunnel at once."""

    async def scenario() -> None:
        async with running_relay(tmp_path / "data", max_channels_per_connection=2) as ctx:
            db = Db(ctx.settings.data_dir)
            echo = EchoServer()
            echo_port = await echo.start()
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            conn = await connect_device(ctx.device_ports[0], device_id, key, _host_ca(ctx))
            try:
                await conn.forward_remote_port("", 0, "127.0.0.1", echo_port)
                tunnel = await await_until(lambda: ctx.tunnels.get(device_id))
                chans = [(await tunnel.create_connection(Collect, "", 0))[0] for _ in range(2)]
                with pytest.raises(asyncssh.ChannelOpenError):
                    await tunnel.create_connection(Collect, "", 0)
                chans[0].close()
                await chans[0].wait_closed()
                await asyncio.sleep(0)  # let the bookkeeping callback run
                chans.append((await tunnel.create_connection(Collect, "", 0))[0])
            finally:
                conn.close()
                echo.close()
                db.close()

    asyncio.run(scenario())


def test_cancelling_the_forward_ends_the_tunnel(tmp_path: Path) -> None:
    """A device that cancels its forward is disconnected and its tunnel row closed."""

    async def scenario() -> None:
        async with running_relay(tmp_path / "data") as ctx:
            db = Db(ctx.settings.data_dir)
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            conn = await connect_device(ctx.device_ports[0], device_id, key, _host_ca(ctx))
            try:
                listener = await conn.forward_remote_port("", 0, "127.0.0.1", 9)
                await await_until(lambda: ctx.tunnels.get(device_id))
                listener.close()
                await asyncio.wait_for(conn.wait_closed(), 5)
                closed = await await_until(
                    lambda: [t for t in db.tunnels(device_id) if t.closed_at is not None]
                )
                assert closed[0].close_reason == "forward cancelled"
                assert ctx.tunnels.get(device_id) is None
            finally:
                conn.close()
                db.close()

    asyncio.run(scenario())


def test_liveness_sweep_stamps_last_keepalive(tmp_path: Path) -> None:
    """One sweep updates last_keepalive_at of every responsive tunnel of this node."""

    async def scenario() -> None:
        async with running_relay(tmp_path / "data") as ctx:
            db = Db(ctx.settings.data_dir)
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            conn = await connect_device(ctx.device_ports[0], device_id, key, _host_ca(ctx))
            try:
                await conn.forward_remote_port("", 0, "127.0.0.1", 9)
                await await_until(lambda: ctx.tunnels.get(device_id))
                before = db.open_tunnels(device_id)[0].last_keepalive_at
                await asyncio.sleep(0.05)
                assert await sweep_once(ctx) == 1
                assert db.open_tunnels(device_id)[0].last_keepalive_at > before
            finally:
                conn.close()
                db.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("interval", "count", "expected"),
    [(30.0, 3, (45.0, 1)), (10.0, 1, (5.0, 1)), (1.0, 2, (1.0, 1)), (0.0, 3, (0.0, 1))],
)
def test_keepalive_options_meet_interval_times_count(
    interval: float, count: int, expected: tuple[float, int]
) -> None:
    """asyncssh drops after interval x (count_max + 1), so the options give interval x count.

    The relay's own probe waits longer than the device's keepalive interval
    (30 s x 3 -> 45 s), so a device that probes itself is never probed.
    """
    s = dataclasses.replace(RelaySettings(), keepalive_interval=interval, keepalive_count=count)
    assert keepalive_options(s) == expected
    got_interval, got_count = keepalive_options(s)
    assert got_interval * (got_count + 1) <= interval * count or interval == 0
