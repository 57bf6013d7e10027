"""Reach the relay: every endpoint, the last good one first, the others staggered in parallel.

RFC 8305 ("happy eyeballs") applied to relay endpoints: the first attempt
starts at once, each further one after `STAGGER` seconds or as soon as the
one before it failed, whichever is sooner. The first attempt to complete the
SSH login wins; the others are cancelled (or closed, if they finished too).
A dead port first in the list therefore costs one stagger, not a timeout.
Every failed attempt is logged with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncssh

from core.data_wire import CAPABILITY
from core.ssh_algorithms import ENCRYPTION_ALGS, KEX_ALGS, MAC_ALGS
from device_client.config import ClientConfig
from device_client.endpoints import Endpoint, default_endpoints, parse_endpoint, remembered_first
from device_client.keepalive import keepalive_options
from device_client.proxy import (
    ProxyError,
    choose_proxy,
    connect_through,
    describe_os_error,
    dial_tcp,
)
from device_client.tls import TlsTrust, client_context
from device_client.wstransport import WebSocketTunnel, websocket_socket

log = logging.getLogger(__name__)

STAGGER = 0.25  # RFC 8305's recommended connection attempt delay
HEAD_START = 1.0  # the endpoint that worked last time gets this long before the next starts
CONNECT_TIMEOUT = 15.0
T = TypeVar("T")


class RelayUnreachable(OSError):
    """Every endpoint failed; the message lists each with its reason."""


@dataclass(frozen=True)
class Dialled:
    """A logged-in SSH connection to the relay and how it got there."""

    conn: asyncssh.SSHClientConnection
    endpoint: Endpoint
    transport: str  # ssh, ssh+connect, wss, wss+connect (ws, ws+connect without TLS)


def config_endpoints(config: ClientConfig) -> tuple[Endpoint, ...]:
    """The endpoints to try: the config's list, else each relay host and port, then WebSocket."""
    if config.relay_endpoints:
        return tuple(parse_endpoint(text) for text in config.relay_endpoints)
    return default_endpoints(config.relay_hosts, config.relay_ports, config.tracker_url)


def tls_trust(config: ClientConfig) -> TlsTrust:
    return TlsTrust(ca_file=config.tls_ca_file, fingerprint=config.tls_fingerprint)


def describe(exc: BaseException) -> str:
    """Why an attempt failed, in a few words; never empty."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g}s"
    if isinstance(exc, ssl.SSLError | ProxyError):
        text = str(exc.args[1] if isinstance(exc, ssl.SSLError) and len(exc.args) > 1 else exc)
        return text.splitlines()[0] if text.strip() else type(exc).__name__
    if isinstance(exc, asyncssh.DisconnectError):
        return f"relay disconnected: {exc.reason or type(exc).__name__}"
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ssh_options(config: ClientConfig, key: asyncssh.SSHKey, transport: str) -> dict[str, object]:
    ca = asyncssh.import_public_key(config.relay_host_ca)
    ka_interval, ka_count = keepalive_options(config.keepalive_interval, config.keepalive_count)
    return {
        "username": config.device_id,
        "client_keys": [key],
        "known_hosts": ([], [ca], []),
        "config": None,  # ignore ~/.ssh/config: the device's settings are the config file
        "agent_path": None,
        "password": None,
        "kbdint_auth": False,
        "preferred_auth": ["publickey"],
        # one probe per interval x count / 2, a dead relay within interval x count
        "keepalive_interval": ka_interval,
        "keepalive_count_max": ka_count,
        "connect_timeout": CONNECT_TIMEOUT,
        "login_timeout": CONNECT_TIMEOUT,
        "kex_algs": KEX_ALGS,
        "encryption_algs": ENCRYPTION_ALGS,
        "mac_algs": MAC_ALGS,
        "compression_algs": None,
        # the relay records how the device came in (a CONNECT proxy is invisible to it)
        # ... and that this client dials data connections on request (core.data_wire)
        "client_version": f"AsyncSSH_{asyncssh.__version__} rly-transport={transport} {CAPABILITY}",
    }


async def dial_endpoint(config: ClientConfig, key: asyncssh.SSHKey, endpoint: Endpoint) -> Dialled:
    """One attempt: proxy (if any), WebSocket (for ws/wss), then the SSH login."""
    proxy = choose_proxy(config.proxy, endpoint.host)
    base = endpoint.scheme if endpoint.websocket else "ssh"
    transport = f"{base}+connect" if proxy else base
    options = _ssh_options(config, key, transport)
    host, port = endpoint.host, endpoint.port
    async with asyncio.timeout(CONNECT_TIMEOUT):
        if endpoint.websocket:
            context = client_context(tls_trust(config)) if endpoint.scheme == "wss" else None
            tunnel = WebSocketTunnel(endpoint, context=context, proxy=proxy)
            conn = await asyncssh.connect(host, port, tunnel=tunnel, **options)
        elif proxy is not None:
            sock = await connect_through(proxy, host, port)
            try:
                conn = await asyncssh.connect(host, port, sock=sock, **options)
            except BaseException:
                sock.close()
                raise
        else:
            conn = await asyncssh.connect(host, port, **options)
    return Dialled(conn, endpoint, transport)


async def race(
    candidates: Sequence[Endpoint],
    attempt: Callable[[Endpoint], Awaitable[T]],
    *,
    stagger: float = STAGGER,
    head_start: float | None = None,
    discard: Callable[[T], Awaitable[None]] | None = None,
) -> tuple[Endpoint, T, list[tuple[Endpoint, str]]]:
    """Staggered parallel attempts; (winner, its result, [(loser, reason)]) or RelayUnreachable.

    `head_start` replaces the first stagger (RFC 8305 lets history set the delay): a
    remembered endpoint that is slow to answer (TLS, a proxy) is not raced at once.
    """
    waiting = list(candidates)
    running: dict[asyncio.Task[T], Endpoint] = {}
    failures: list[tuple[Endpoint, str]] = []

    def start_next() -> None:
        endpoint = waiting.pop(0)
        running[asyncio.ensure_future(attempt(endpoint))] = endpoint

    if waiting:
        start_next()
    delay = stagger if head_start is None else head_start
    try:
        while running:
            done, _ = await asyncio.wait(
                running, timeout=delay if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            delay = stagger
            if not done:
                start_next()  # the stagger passed with no answer: start the next one too
                continue
            for task in done:
                endpoint = running.pop(task)
                exc = task.exception()
                if exc is None:
                    await _cancel_rest(running, discard)
                    return endpoint, task.result(), failures
                reason = describe(exc)
                failures.append((endpoint, reason))
                log.info("relay %s failed: %s", endpoint, reason)
            if waiting:
                start_next()  # a failure starts the next attempt at once
    finally:
        await _cancel_rest(running, discard)
    summary = "; ".join(f"{e} {why}" for e, why in failures) or "no relay endpoints configured"
    raise RelayUnreachable(f"every relay endpoint failed: {summary}")


async def _cancel_rest(
    running: dict[asyncio.Task[T], Endpoint], discard: Callable[[T], Awaitable[None]] | None
) -> None:
    """Cancel the attempts still going; close any that succeeded in the meantime."""
    tasks = list(running)
    running.clear()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            result = await task
            if discard is not None:
                await discard(result)


async def _close(dialled: Dialled) -> None:
    dialled.conn.close()
    with contextlib.suppress(OSError, asyncssh.Error):
        await dialled.conn.wait_closed()


async def dial_relay(
    config: ClientConfig, key: asyncssh.SSHKey, last_good: str | None = None
) -> Dialled:
    """Log in to the relay over the first endpoint that works (the last good one tried first)."""
    order = remembered_first(config_endpoints(config), last_good)
    remembered = bool(order) and str(order[0]) == last_good
    _endpoint, dialled, failures = await race(
        order,
        lambda e: dial_endpoint(config, key, e),
        head_start=HEAD_START if remembered else None,
        discard=_close,
    )
    first = "last good, tried first" if str(dialled.endpoint) == last_good else "first to answer"
    failed = f"; failed: {', '.join(str(e) for e, _ in failures)}" if failures else ""
    log.info(
        "relay %s connected transport=%s (%s%s)", dialled.endpoint, dialled.transport, first, failed
    )
    return dialled


def data_connector(
    config: ClientConfig, tunnel: Endpoint
) -> Callable[[str, int], Awaitable[socket.socket]]:
    """How data connections are dialled: like the tunnel (its proxy; over its WebSocket when
    the tunnel's own endpoint is one, the relay's dispatch reading the same bytes there)."""

    async def connect(host: str, port: int) -> socket.socket:
        if tunnel.websocket and (host, port) == (tunnel.host, tunnel.port):
            context = client_context(tls_trust(config)) if tunnel.scheme == "wss" else None
            proxy = choose_proxy(config.proxy, tunnel.host)
            return await websocket_socket(tunnel, context=context, proxy=proxy)
        return await dial_tcp(config.proxy, host, port)

    return connect
