"""Ask a device for a session's data connection and wait for it, briefly.

The ticket is stored (hashed) first, then the dial request goes over the
device's tunnel on a control channel; the session waits at most
`relay.data_connect_timeout` in all. None means "use the tunnel": a plain
OpenSSH device (no capability), a timeout of 0, a device that did not dial in
time, or any error on the way. The fallback is the path every session took
before data connections existed, so no session fails that worked then.
"""

from __future__ import annotations

import asyncio
import logging

import asyncssh
from sqlalchemy.exc import SQLAlchemyError

from relay.context import RelayContext
from relay.data.accept import DataStream
from relay.data.tickets import dial_request, new_ticket, store_ticket
from relay.device.tunnels import DeviceTunnel

log = logging.getLogger(__name__)
RETRY_PAUSE = 0.05


def endpoints(ctx: RelayContext) -> list[tuple[str, int]]:
    """This relay's device endpoints, in dial order (none without a public host: the device
    then dials the endpoint its tunnel uses)."""
    return [(ctx.public_host, port) for port in ctx.device_ports if ctx.public_host]


async def request_data_connection(
    ctx: RelayContext, tunnel: DeviceTunnel, device_id: str, session_id: str
) -> DataStream | None:
    """The session's data connection, or None to use the tunnel."""
    timeout = ctx.settings.relay.data_connect_timeout
    if timeout <= 0 or not tunnel.data_capable or tunnel.at_capacity:
        return None  # at capacity the tunnel path refuses it with today's words
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ticket = new_ticket()
    waiter = ctx.data.expect(session_id, device_id)
    stored = asyncio.ensure_future(
        ctx.db(
            lambda s: store_ticket(
                s, ticket=ticket, device_id=device_id, session_id=session_id, node=ctx.node_name
            )
        )
    )  # while the control channel opens; the request is written once the row is in
    stored.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, if not awaited
    try:
        request = dial_request(
            ticket=ticket, session_id=session_id, node=ctx.node_name, endpoints=endpoints(ctx)
        )
        try:
            await asyncio.wait_for(tunnel.send_dial(request, stored), deadline - loop.time())
        except asyncssh.ChannelOpenError:
            # A tunnel that just came up: the device may see our channel before it has set up
            # the forward it asked for (its reply and our open arrive together). Once more.
            await asyncio.sleep(RETRY_PAUSE)
            await asyncio.wait_for(tunnel.send_dial(request, stored), deadline - loop.time())
        return await asyncio.wait_for(asyncio.shield(waiter.arrived), deadline - loop.time())
    except (
        TimeoutError,
        OSError,
        asyncssh.Error,
        asyncssh.ChannelOpenError,
        SQLAlchemyError,
    ) as exc:
        arrived = waiter.arrived
        if arrived.done() and not arrived.cancelled():  # it came as the wait ran out: use it
            stream: DataStream = arrived.result()
            return stream
        log.info("no data connection device=%s session=%s (%s); using the tunnel",
                 device_id, session_id, type(exc).__name__)  # fmt: skip
        return None
    finally:
        ctx.data.forget(session_id)
        if not stored.done():
            stored.cancel()  # the thread still finishes its write; nobody waits for it
