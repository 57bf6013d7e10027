"""Reading a session's output up to a marker, approving rly sessions on the way.

The relay asks for approval per SSH session, so a multiplexed
`connect DEVICE 'cmd'` prints an approval URL on its output before the
device runs anything. Every leg waits for a marker the device prints when its
command starts; while waiting, any approval URL seen is handed to `approve`
(once), so the clock never includes the approval. Sessions without a PTY
may print it on stderr instead: `StderrWatcher` handles that side.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from collections.abc import Callable
from typing import IO

from bench.common import Unavailable

Approve = Callable[[str], None]
URL_RE = re.compile(r"(https?://\S+/approve/([A-Za-z0-9_\-]+))")


def read_until(fd: int, marker: bytes, *, timeout: float, approve: Approve | None = None) -> bytes:
    """Read `fd` until `marker`; return what followed it. Unavailable on EOF or timeout."""
    seen = b""
    approved = False
    deadline = time.monotonic() + timeout
    while marker not in seen:
        chunk = read_some(fd, deadline - time.monotonic(), what=marker, seen=seen)
        seen += chunk
        if approve is not None and not approved:
            found = URL_RE.search(seen.decode(errors="replace"))
            if found is not None:
                approve(found.group(1))
                approved = True
    return seen.split(marker, 1)[1]


def read_some(fd: int, timeout: float, *, what: bytes = b"data", seen: bytes = b"") -> bytes:
    """One read of up to 1 MiB, waiting at most `timeout`; Unavailable on EOF or timeout."""
    if timeout <= 0 or not select.select([fd], [], [], timeout)[0]:
        raise Unavailable(f"no {what!r} within the time allowed (got {seen[-160:]!r})")
    try:
        chunk = os.read(fd, 1 << 20)
    except OSError:  # EIO: the process closed the PTY
        chunk = b""
    if not chunk:
        raise Unavailable(f"output ended before {what!r}: {seen[-160:]!r}")
    return chunk


class StderrWatcher:
    """Drain a process's stderr in a thread: approve a URL printed there, keep the tail."""

    def __init__(self, stream: IO[bytes] | None, approve: Approve | None) -> None:
        self.text = ""
        self._stream, self._approve = stream, approve
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._stream is None:
            return
        approved = False
        for line in iter(self._stream.readline, b""):
            self.text = (self.text + line.decode(errors="replace"))[-4000:]
            found = URL_RE.search(self.text)
            if self._approve is not None and found is not None and not approved:
                approved = True
                self._approve(found.group(1))

    def tail(self) -> str:
        """The last stderr lines, once the process has ended."""
        self._thread.join(timeout=5)
        return self.text.strip()[-300:]
