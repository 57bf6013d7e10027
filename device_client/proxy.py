"""HTTP CONNECT proxies: which one applies to a host, and opening a tunnel through it.

The proxy comes from the client config (`proxy = "http://user:pass@host:3128"`)
or else from $HTTPS_PROXY / $https_proxy; $NO_PROXY / $no_proxy lists hosts
reached directly. Proxy credentials are secrets: `str(proxy)` and every error
message name only the proxy's host and port.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

MAX_REPLY_HEADER = 16 * 1024
ENV_PROXY = ("HTTPS_PROXY", "https_proxy")
ENV_NO_PROXY = ("NO_PROXY", "no_proxy")
AUTH_REFUSED = ("407", "401")  # tinyproxy answers a bad password with 401
AUTH_HINT = " (check the proxy user and password)"


class ProxyError(OSError):
    """The proxy could not be reached or refused the CONNECT (one line, no credentials)."""


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy that supports CONNECT, optionally with Basic credentials."""

    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}"

    def authorization(self) -> str | None:
        """The Proxy-Authorization header value, or None without credentials."""
        if not self.username and not self.password:
            return None
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def url_with_credentials(self) -> str:
        """The proxy URL for httpx (which sends the credentials as Basic auth)."""
        if not self.username and not self.password:
            return str(self)
        user = quote(self.username, safe="")
        return f"http://{user}:{quote(self.password, safe='')}@{self.host}:{self.port}"


def parse_proxy(text: str, origin: str) -> Proxy:
    """Parse `http://[user:pass@]host[:port]`; the error names `origin`, never the value."""
    try:
        parts = urlsplit(text.strip() if "://" in text else f"http://{text.strip()}")
        port = parts.port or 3128
    except ValueError:
        raise ProxyError(f"{origin} has a bad port") from None
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ProxyError(f"{origin} must be http://[user:password@]host:port")
    return Proxy(parts.hostname, port, unquote(parts.username or ""), unquote(parts.password or ""))


def _bypassed(host: str, no_proxy: str) -> bool:
    """Whether NO_PROXY names this host (exact, domain suffix, IP or CIDR; '*' is all)."""
    host = host.strip("[]").lower().rstrip(".")
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name = entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry
        name = name.strip("[]").lstrip(".").rstrip(".")
        if host == name or host.endswith("." + name):
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                return True
        except ValueError:
            continue
    return False


def choose_proxy(
    configured: str, host: str, environ: Mapping[str, str] | None = None
) -> Proxy | None:
    """The proxy for `host`: the config's, else the environment's; None when bypassed."""
    env = os.environ if environ is None else environ
    no_proxy = next((env[k] for k in ENV_NO_PROXY if env.get(k)), "")
    if configured:
        proxy = parse_proxy(configured, "config key 'proxy'")
    else:
        name = next((k for k in ENV_PROXY if env.get(k)), None)
        if name is None:
            return None
        proxy = parse_proxy(env[name], f"${name}")
    return None if _bypassed(host, no_proxy) else proxy


async def open_socket(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (each resolved address in turn)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"{host} has no address")
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise error


async def dial_tcp(configured: str, host: str, port: int) -> socket.socket:
    """A socket to host:port, through the proxy that applies to it (CONNECT), else direct."""
    proxy = choose_proxy(configured, host)
    if proxy is None:
        return await open_socket(host, port)
    return await connect_through(proxy, host, port)


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _read_reply_header(sock: socket.socket) -> bytes:
    """The proxy's reply up to the blank line, read byte by byte so no tunnel byte is lost."""
    loop = asyncio.get_running_loop()
    reply = bytearray()
    while not reply.endswith(b"\r\n\r\n"):
        chunk = await loop.sock_recv(sock, 1)
        if not chunk:
            raise ConnectionResetError("proxy closed the connection")
        reply += chunk
        if len(reply) > MAX_REPLY_HEADER:
            raise ProxyError("proxy reply header is too long")
    return bytes(reply)


async def connect_through(proxy: Proxy, host: str, port: int) -> socket.socket:
    """A socket tunnelled to host:port by the proxy's CONNECT; ProxyError when refused."""
    loop = asyncio.get_running_loop()
    where = f"proxy {proxy}"
    try:
        sock = await open_socket(proxy.host, proxy.port)
    except OSError as exc:
        raise ProxyError(f"{where} unreachable: {describe_os_error(exc)}") from None
    try:
        target = _target(host, port)
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        auth = proxy.authorization()
        if auth is not None:
            lines.append(f"Proxy-Authorization: {auth}")
        await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
        status_line = (await _read_reply_header(sock)).split(b"\r\n", 1)[0]
        status = status_line.decode("latin-1", "replace").split(" ", 2)
        if len(status) < 2 or not status[0].startswith("HTTP/"):
            raise ProxyError(f"{where} sent a reply that is not HTTP")
        if status[1] != "200":
            why = " ".join(status[1:])[:80]
            hint = AUTH_HINT if status[1] in AUTH_REFUSED else ""
            raise ProxyError(f"{where} refused CONNECT {target}: {why}{hint}")
    except ProxyError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ProxyError(f"{where} failed during CONNECT: {describe_os_error(exc)}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def describe_os_error(exc: OSError) -> str:
    """A short reason that is never empty ('connection refused', 'timed out', ...)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if exc.errno:
        return os.strerror(exc.errno).lower()
    text = exc.strerror or str(exc)
    return text.lower() if exc.strerror else (text or type(exc).__name__)
