"""ASGI middleware that caps request bodies, with or without a Content-Length.

The body is read here (at most `max_bytes`) and replayed to the app, so an
oversize chunked upload is refused with 413 before any route sees it.
Routes need the whole body anyway: signatures cover its hash.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tracker.errors import error_response

MAX_BODY = 64 * 1024
SCOPE_KEY = "rly.body_limit"  # the cap already enforced further out, if any


class BodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get(SCOPE_KEY, self.max_bytes + 1) <= self.max_bytes:
            await self.app(scope, receive, send)  # not HTTP, or already capped as tightly
            return
        declared = _content_length(scope)
        if declared == -1:
            await error_response(400, "invalid Content-Length header")(scope, receive, send)
            return
        if declared is not None and declared > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body = await self._read(receive)
        if body is None:
            await self._too_large(scope, receive, send)
            return
        scope[SCOPE_KEY] = self.max_bytes
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it grows past the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # client went away; the app sees an empty body and its disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body is larger than {self.max_bytes // 1024} KiB"
        await error_response(413, message)(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length, None when absent, -1 when malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isascii() and text.isdigit() else -1
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
