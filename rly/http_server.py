"""uvicorn on sockets we bind ourselves, without its own signal handling.

Several servers share one loop in `rly serve`, so signals are handled once by
the caller; binding the socket ourselves turns "port in use" into a clean
one-line error and avoids port races in tests.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn

from rly.http_limits import DeadlineHttpToolsProtocol, limit_body
from rly.ws_limits import BoundedWebSocketProtocol


class EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (at most the hard limit); the limit now.

    Each long-polling device holds one connection, so a tracker of a large
    on-demand fleet needs far more descriptors than the usual soft 1024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return int(soft)


def make_server(
    app: Any, *, tls_cert: str, tls_key: str, log_level: str, max_connections: int = 16384
) -> EmbeddedServer:
    kwargs: dict[str, Any] = {}
    if tls_cert:
        kwargs = {
            "ssl_certfile": tls_cert,
            "ssl_keyfile": tls_key,
            "ssl_version": ssl.PROTOCOL_TLS_SERVER,
        }
    config = uvicorn.Config(
        limit_body(app),
        http=DeadlineHttpToolsProtocol,
        log_level=log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=15,
        timeout_graceful_shutdown=2,  # long polls must not hold up SIGTERM
        limit_concurrency=max_connections,  # above it: 503, the device retries
        # WebSocket device tunnels (relay.device.ws_tunnel): the sans-I/O implementation (the
        # legacy one is deprecated) with a bound on unread pongs (rly.ws_limits), messages
        # capped at 1 MiB (a device sends at most 64 KiB each), no WebSocket pings (the SSH
        # keepalives inside find dead peers; a ping per tunnel would double the idle cost)
        ws=BoundedWebSocketProtocol,
        ws_max_size=1024 * 1024,
        ws_ping_interval=None,
        lifespan="off",
        log_config=None,
        **kwargs,
    )
    return EmbeddedServer(config)
