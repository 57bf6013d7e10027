"""`rly serve`: relay + tracker + portal in one process and one asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.routing import Route, WebSocketRoute

from approval_portal.app import create_app as create_portal
from core import db
from core.config import Settings, with_bound_http_port
from core.feed import run_feed
from core.hub import Hub
from core.keys import KeyStore, check_secret_file
from core.tls_identity import file_fingerprint
from relay.app import Relay, start_relay
from relay.context import RelayContext
from relay.device.ws_tunnel import PATH as TUNNEL_PATH
from relay.device.ws_tunnel import WebSocketTunnels, make_tunnel_app
from rly.health import create_root_app
from rly.http_server import bind_tcp, make_server, raise_open_files_limit
from tracker.app import create_app as create_tracker

log = logging.getLogger(__name__)
PARTS = ("relay", "tracker", "portal")
FILES_MARGIN = 4096  # descriptors beyond HTTP connections: tunnels, database, logs


class StartupError(RuntimeError):
    """Start-up cannot go on; the message is one line for the operator."""


@dataclass
class Prepared:
    settings: Settings
    keys: KeyStore
    engine: Engine
    sessions: sessionmaker[Session]
    node_name: str
    public_host: str


def prepare(settings: Settings) -> Prepared:
    """Keys, database and migrations: everything that may fail before we listen."""
    node_name = settings.relay.node_name or socket.gethostname()
    public_host = settings.relay.public_host or urlsplit(settings.http.public_url).hostname or ""
    names = [node_name, public_host, "localhost", "127.0.0.1", "::1"]
    keys = KeyStore.load_or_create(settings.data_dir, [n for n in names if n])
    url = settings.effective_database_url
    if not settings.database_url:  # the embedded database holds password hashes and TOTP secrets
        for suffix in ("", "-wal", "-shm"):
            path = settings.data_dir / f"rly.sqlite3{suffix}"
            if path.exists():
                check_secret_file(path)
    engine = db.make_engine(url)
    db.check_connection(engine)
    if url.startswith("sqlite"):
        db.upgrade(url)
    else:  # a shared database is migrated once, by `rly db upgrade`, not by every node
        db.check_migrated(engine)
    return Prepared(settings, keys, engine, db.make_sessions(engine), node_name, public_host)


def build_http_app(
    p: Prepared, hub: Hub, parts: set[str], tunnels: WebSocketTunnels | None = None
) -> FastAPI:
    app = create_root_app(p.sessions)
    if tunnels is not None:  # before the tracker's /api/v1 mount, which would take the path
        app.router.routes[:0] = [WebSocketRoute(TUNNEL_PATH, tunnels), Route(TUNNEL_PATH, tunnels)]
    if "tracker" in parts:
        app.mount("/api/v1", create_tracker(p.settings, p.sessions, hub, p.keys))
    if "portal" in parts:
        app.mount("/", create_portal(p.settings, p.sessions, hub))
    return app


async def serve(p: Prepared, parts: set[str]) -> int:
    loop = asyncio.get_running_loop()
    hub = Hub()
    hub.bind(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    s = p.settings
    relay: Relay | None = None
    http_sock: socket.socket | None = None
    try:
        if parts & {"tracker", "portal", "relay"}:  # the relay: device tunnels over WebSocket
            http_sock = _bind(s.http.listen, s.http.port, "http.port")
            s = p.settings = with_bound_http_port(s, http_sock.getsockname()[1])
        if "relay" in parts:
            ctx = RelayContext(
                settings=s,
                sessions=p.sessions,
                keys=p.keys,
                hub=hub,
                node_name=p.node_name,
                public_host=p.public_host,
            )
            try:
                relay = await start_relay(ctx)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen for SSH on {s.relay.listen}: {exc.strerror or exc}"
                ) from None
    except StartupError:
        if http_sock is not None:
            http_sock.close()
        raise
    feed = run_feed(p.sessions, hub, listen=s.database_notify, name=p.node_name)
    tasks = [asyncio.create_task(feed, name="feed")]
    server = None
    if http_sock is not None:
        tunnels = None
        if relay is not None:
            tunnels = await make_tunnel_app(relay.ctx, tls=bool(s.http.tls_cert))
        files = raise_open_files_limit(s.http.max_connections + FILES_MARGIN)
        if files < s.http.max_connections:
            log.warning("open files limit %d < http.max_connections %d: raise LimitNOFILE",
                        files, s.http.max_connections)  # fmt: skip
        server = make_server(
            build_http_app(p, hub, parts, tunnels),
            tls_cert=s.http.tls_cert,
            tls_key=s.http.tls_key,
            log_level=s.log_level,
            max_connections=s.http.max_connections,
        )
        tasks.append(asyncio.create_task(server.serve(sockets=[http_sock]), name="http"))
        while not server.started:
            if tasks[-1].done():
                raise StartupError(f"HTTP server failed to start: {tasks[-1].exception()}")
            await asyncio.sleep(0.02)
    _announce(s, parts, relay, http_sock)
    await stop.wait()
    log.info("shutting down")
    hub.close()
    if server is not None:
        server.should_exit = True
    if relay is not None:
        await relay.close()
    for task in tasks:
        if task.get_name() != "http":
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
    p.engine.dispose()
    return 0


def _bind(host: str, port: int, key: str) -> socket.socket:
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {host}:{port} ({key}): {exc.strerror or exc}"
        ) from None


def _announce(
    s: Settings, parts: set[str], relay: Relay | None, http_sock: socket.socket | None
) -> None:
    lines = []
    if relay is not None:
        lines.append(f"rly: technician ssh on {s.relay.listen}:{relay.technician_port}")
        lines += [f"rly: device ssh on {s.relay.listen}:{port}" for port in relay.device_ports]
    if http_sock is not None:
        host, port = http_sock.getsockname()[:2]
        scheme = "https" if s.http.tls_cert else "http"
        lines.append(f"rly: http on {host}:{port}")
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base = f"{scheme}://{shown}:{port}"
        if "tracker" in parts:
            lines.append(f"rly: tracker {base}/api/v1")
        if "portal" in parts:
            lines.append(f"rly: portal {base}  (public URL {s.http.public_url})")
        if relay is not None:
            ws = "wss" if s.http.tls_cert else "ws"
            lines.append(f"rly: device websocket {ws}://{shown}:{port}{TUNNEL_PATH}")
    if s.http.tls_cert:
        pin = file_fingerprint(Path(s.http.tls_cert))
        lines.append(f"rly: tls certificate {pin}  (devices: --tracker-fingerprint {pin})")
    lines.append("rly: ready")
    print("\n".join(lines), flush=True)
    sys.stdout.flush()
