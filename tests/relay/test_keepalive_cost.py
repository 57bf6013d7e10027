"""Keepalive work per idle tunnel is small, a dead peer is still found within interval x count."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from device_client.config import ClientConfig
from device_client.dialer import _ssh_options
from device_client.keepalive import keepalive_options
from tests.relay.device_port_support import (
    Db,
    FreezableProxy,
    await_until,
    connect_device,
    new_key,
)
from tests.relay.test_device_port_inprocess import running_relay

INTERVAL, COUNT = 1.0, 2


def test_rly_client_keepalive_probes_once_per_half_window_and_detects_in_time() -> None:
    """rly-client probes once per interval x count / 2 at most and detects by interval x count."""
    interval, count_max = keepalive_options(30.0, 3)
    assert count_max == 1
    assert 30.0 * 3 / 2 * 0.8 < interval < 30.0 * 3 / 2  # before the relay's own probe
    assert interval * (count_max + 1) <= 30.0 * 3  # asyncssh drops after interval x (max + 1)
    assert keepalive_options(0.0, 3) == (0.0, 1)


def test_rly_client_dials_with_the_mapped_keepalive(tmp_path: Path) -> None:
    """rly-client's SSH options carry the mapped pair, not the configured one as is."""
    key = new_key()
    config = ClientConfig(
        tracker_url="https://tracker.invalid",
        device_id="dev1",
        key_file=tmp_path / "key",
        relay_hosts=("127.0.0.1",),
        relay_ports=(2222,),
        relay_host_ca=key.export_public_key().decode(),
        user_ca="",
        state_file=tmp_path / "state",
        keepalive_interval=20.0,
        keepalive_count=4,
    )
    options = _ssh_options(config, key, "ssh")
    assert (options["keepalive_interval"], options["keepalive_count_max"]) == (36.0, 1)


def test_device_finds_a_frozen_relay_within_interval_x_count(tmp_path: Path) -> None:
    """A device using rly-client's keepalive drops a relay that went silent within interval x count.

    asyncssh given the configured pair as is would take interval x (count + 1).
    """

    async def scenario() -> None:
        settings = {"keepalive_interval": INTERVAL, "keepalive_count": COUNT}
        async with running_relay(tmp_path / "data", **settings) as ctx:
            db = Db(ctx.settings.data_dir)
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            proxy = FreezableProxy(ctx.device_ports[0])
            ka_interval, ka_count = keepalive_options(INTERVAL, COUNT)
            conn = await connect_device(
                await proxy.start(),
                device_id,
                key,
                ctx.keys.host_ca_public,
                keepalive_interval=ka_interval,
                keepalive_count_max=ka_count,
            )
            try:
                await conn.forward_remote_port("", 0, "127.0.0.1", 9)
                await await_until(lambda: ctx.tunnels.get(device_id))
                loop = asyncio.get_running_loop()
                proxy.freeze()
                frozen_at = loop.time()
                await asyncio.wait_for(conn.wait_closed(), 10)
                assert loop.time() - frozen_at < INTERVAL * COUNT + 0.3
            finally:
                conn.abort()
                proxy.close()
                db.close()

    asyncio.run(scenario())


def test_tunnel_socket_has_kernel_keepalives_bounded_by_interval_x_count(tmp_path: Path) -> None:
    """The relay's tunnel socket: TCP keepalives and TCP_USER_TIMEOUT within interval x count."""

    async def scenario() -> None:
        settings = {"keepalive_interval": 10.0, "keepalive_count": 3}
        async with running_relay(tmp_path / "data", **settings) as ctx:
            db = Db(ctx.settings.data_dir)
            key = new_key()
            device_id = db.add_device(db.add_account(), key)
            conn = await connect_device(
                ctx.device_ports[0], device_id, key, ctx.keys.host_ca_public
            )
            try:
                await conn.forward_remote_port("", 0, "127.0.0.1", 9)
                tunnel = await await_until(lambda: ctx.tunnels.get(device_id))
                sock = tunnel.conn.get_extra_info("socket")
                get = sock.getsockopt
                assert get(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                idle = get(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                probes = get(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
                probes *= get(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
                assert (idle, probes) == (15, 15)
                assert get(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
            finally:
                conn.close()
                db.close()

    asyncio.run(scenario())
