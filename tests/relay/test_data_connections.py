"""The device port's data-connection preamble and tickets, with raw sockets against a real relay.

The relay runs in this process (as `rly serve` starts it) so a test can make
a session wait for its data connection (`ctx.data.expect`) and store tickets
the way `relay.data.request` does.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from core.models import DataConnection, utcnow
from device_client.data_sessions import DataDialer
from device_client.tunnel import Activity
from relay.context import RelayContext
from relay.data.accept import DataStream
from relay.data.tickets import dial_request, new_ticket, store_ticket, ticket_hash
from relay.device import port as device_port
from tests.device_client.test_tunnel import Keys, device_config
from tests.relay.device_port_support import new_key
from tests.relay.test_device_port_inprocess import running_relay
from tests.relay.test_technician_support import TechDb


async def present(port: int, line: bytes, timeout: float = 5.0) -> bytes:
    """Send `line` on a fresh connection; what the relay answers before it closes (b"" = closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(line)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4), timeout)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def preamble(ticket: str) -> bytes:
    return f"RLY-DATA/1 {ticket}\r\n".encode()


async def ticket_for(ctx: RelayContext, device_id: str, session_id: str, node: str = "") -> str:
    ticket = new_ticket()
    await ctx.db(
        lambda s: store_ticket(
            s, ticket=ticket, device_id=device_id, session_id=session_id, node=node or ctx.node_name
        )
    )
    return ticket


def test_tickets_are_single_use_bound_and_refusals_audited(tmp_path: Path) -> None:
    """A valid ticket gets OK once; forged, replayed, expired, other-node and other-device
    tickets are closed without a reply and audited with their reason."""

    async def scenario() -> None:
        async with running_relay(tmp_path / "data") as ctx:
            db = TechDb(ctx.settings.data_dir)
            try:
                account = db.add_account()
                dev_a, dev_b = db.add_device(account, new_key()), db.add_device(account, new_key())
                port = ctx.device_ports[0]

                waiter = ctx.data.expect("sess-a", dev_a)
                good = await ticket_for(ctx, dev_a, "sess-a")
                assert await present(port, preamble(good)) == b"OK\r\n"
                stream = await asyncio.wait_for(waiter.arrived, 5)
                assert isinstance(stream, DataStream) and stream.peer[0] == "127.0.0.1"
                stream.close()

                ctx.data.expect("sess-a2", dev_a)
                assert await present(port, preamble(good)) == b""  # replayed

                assert await present(port, preamble(new_ticket())) == b""  # forged
                assert await present(port, preamble("not-a-ticket")) == b""  # forged, malformed

                ctx.data.expect("sess-e", dev_a)
                old = await ticket_for(ctx, dev_a, "sess-e")

                def expire(s: Session) -> None:
                    s.execute(
                        update(DataConnection)
                        .where(DataConnection.ticket_hash == ticket_hash(old))
                        .values(expires_at=utcnow() - timedelta(seconds=1))
                    )

                await ctx.db(expire)
                assert await present(port, preamble(old)) == b""  # expired

                ctx.data.expect("sess-n", dev_a)
                elsewhere = await ticket_for(ctx, dev_a, "sess-n", node="node-b")
                assert await present(port, preamble(elsewhere)) == b""  # other node

                ctx.data.expect("sess-x", dev_a)  # session x waits for device A ...
                crossed = await ticket_for(ctx, dev_b, "sess-x")  # ... B's ticket names it
                assert await present(port, preamble(crossed)) == b""  # other device

                refusals = [(e.target, e.detail) for e in db.actions("device.data_refused")]
                assert refusals == [
                    (dev_a, "replayed"),
                    ("", "forged"),
                    ("", "forged"),
                    (dev_a, "expired"),
                    (dev_a, "other node node-b"),
                    (dev_b, "other device"),
                ]
            finally:
                db.close()

    asyncio.run(scenario())


def test_wrong_first_bytes_and_silence_are_dropped_within_the_preauth_limits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Garbage, an overlong preamble and silence are dropped; each holds a pre-auth place
    meanwhile, so a source over its cap is refused at once, and a tunnel still logs in."""
    monkeypatch.setattr(device_port, "PREAMBLE_TIMEOUT", 0.5)

    async def scenario() -> None:
        async with running_relay(tmp_path / "data", max_unauthenticated_per_source=2) as ctx:
            port = ctx.device_ports[0]
            assert await present(port, b"GET / HTTP/1.1\r\n\r\n") == b""
            assert await present(port, b"RLY-DATA/1 " + b"A" * 200) == b""
            loop = asyncio.get_running_loop()
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            started = loop.time()
            assert await present(port, b"SSH-2.0-x\r\n", timeout=0.3) == b""  # over the cap
            assert loop.time() - started < 0.3
            for reader, _writer in silent:  # silence is dropped after the preamble timeout
                assert await asyncio.wait_for(reader.read(1), 3) == b""
            assert loop.time() - started < 2.0
            for _reader, writer in silent:
                writer.close()
            answer = await present(port, b"SSH-2.0-probe\r\n")  # room again: asyncssh answers
            assert answer == b"SSH-"

    asyncio.run(scenario())


class _Received(asyncio.Protocol):
    """What comes back on an accepted data connection (no SSH: the target echoes)."""

    def __init__(self) -> None:
        self.data = b""
        self.got = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.got.set()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_device_dials_a_request_and_splices_it_to_its_target(tmp_path: Path) -> None:
    """rly-client's dialer, given a request as a check-in would carry it, tries the endpoints
    in order, presents the ticket, and splices the accepted stream to its sshd target."""

    async def scenario() -> None:
        async with running_relay(tmp_path / "data") as ctx:
            db = TechDb(ctx.settings.data_dir)
            echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
            try:
                device_id = db.add_device(db.add_account(), new_key())
                config = device_config(
                    tmp_path, Keys.make(), ctx.device_ports[0],
                    target_port=echo.sockets[0].getsockname()[1],
                )  # fmt: skip
                waiter = ctx.data.expect("sess-d", device_id)
                ticket = await ticket_for(ctx, device_id, "sess-d")
                endpoints = [("127.0.0.1", 1), ("127.0.0.1", ctx.device_ports[0])]  # 1: refused
                request = dial_request(
                    ticket=ticket, session_id="sess-d", node=ctx.node_name, endpoints=endpoints
                )
                activity = Activity()
                DataDialer(config, activity).request(request)
                stream = await asyncio.wait_for(waiter.arrived, 5)
                transport, received = await stream.create_connection(_Received, "", 0)
                transport.write(b"through the splice")
                while received.data != b"through the splice":
                    received.got.clear()
                    await asyncio.wait_for(received.got.wait(), 5)
                assert activity.open == 1  # an open data connection keeps on-demand tunnels up
                transport.close()
                for _ in range(100):
                    if activity.open == 0:
                        break
                    await asyncio.sleep(0.05)
                assert activity.open == 0
            finally:
                echo.close()
                db.close()

    asyncio.run(scenario())
