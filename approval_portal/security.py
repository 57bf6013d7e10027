"""Response headers, CSRF comparison, safe redirects and the client address.

The portal never loads anything from elsewhere and runs no inline script, so the
CSP is `default-src 'self'` with nothing added (the recording pages add
`'wasm-unsafe-eval'` for the player's WebAssembly); pages are never cached or
framed, and the Referer never leaks an approval token.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
# The recording player (static/vendor/asciinema-player) compiles its terminal from WebAssembly.
PLAYER_CSP = CSP + "; script-src 'self' 'wasm-unsafe-eval'"
PLAYER_PAGES = "/recordings/"
HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}
HSTS = "max-age=31536000"


class SecurityHeaders:
    """ASGI middleware: security headers on every response, no-store on every page."""

    def __init__(self, app: ASGIApp, *, https: bool) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")
        player = str(scope.get("path", "")).startswith(PLAYER_PAGES)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.decode("latin-1").lower() not in HEADERS
                    and k.decode("latin-1").lower() != "cache-control"
                ]
                headers += [(k.encode(), v.encode()) for k, v in HEADERS.items()]
                if player:
                    headers = [(k, PLAYER_CSP.encode() if k == b"content-security-policy" else v)
                               for k, v in headers]  # fmt: skip
                cache = "public, max-age=3600" if static else "no-store"
                headers.append((b"cache-control", cache.encode()))
                if self.https:
                    headers.append((b"strict-transport-security", HSTS.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def same_token(given: str, expected: str) -> bool:
    """Constant-time comparison; an empty token never matches."""
    return bool(given) and bool(expected) and hmac.compare_digest(given, expected)


def safe_next(value: str | None, default: str = "/") -> str:
    """A same-site relative path to go to after login, or `default` (no open redirect)."""
    if not value or len(value) > 512:
        return default
    if not value.startswith("/") or value.startswith("//"):
        return default
    if "\\" in value or any(ord(ch) < 33 or ord(ch) == 127 for ch in value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def client_ip(request: Request) -> str:
    """The peer address (proxy headers are not trusted: uvicorn runs without them)."""
    return request.client.host if request.client else ""
