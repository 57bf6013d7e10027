"""One asciicast v2 file per device session, under <data_dir>/recordings, mode 0600.

Only output is recorded ("o" events, plus "r" on resize): what the technician
typed is echoed by the device anyway, and passwords typed at prompts are not.
Writes go through a buffered file and are flushed every second at most, so
recording costs no system call per keystroke.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import IO

from core.keys import ensure_private_dir

log = logging.getLogger(__name__)
FLUSH_INTERVAL = 1.0


class Recording:
    """An open asciicast v2 file; every method is a no-op after close()."""

    def __init__(self, path: Path, handle: IO[str]) -> None:
        self.path = path
        self._handle: IO[str] | None = handle
        self._start = time.monotonic()
        self._flushed = self._start

    @classmethod
    def create(
        cls, data_dir: Path, session_id: str, *, width: int, height: int, term: str, title: str
    ) -> Recording:
        directory = data_dir / "recordings"
        ensure_private_dir(directory)
        path = directory / f"{session_id}.cast"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        handle = os.fdopen(fd, "w", encoding="utf-8", errors="replace")
        header = {
            "version": 2,
            "width": max(width, 1),
            "height": max(height, 1),
            "timestamp": int(time.time()),
            "title": title,
            "env": {"TERM": term or "unknown"},
        }
        handle.write(json.dumps(header) + "\n")
        return cls(path, handle)

    def _event(self, kind: str, data: str) -> None:
        if self._handle is None:
            return
        now = time.monotonic()
        try:
            self._handle.write(json.dumps([round(now - self._start, 6), kind, data]) + "\n")
            if now - self._flushed >= FLUSH_INTERVAL:
                self._handle.flush()
                self._flushed = now
        except OSError as exc:
            log.warning("recording stopped path=%s error=%s", self.path, exc)
            self.close()

    def output(self, data: str) -> None:
        self._event("o", data)

    def resize(self, width: int, height: int) -> None:
        self._event("r", f"{width}x{height}")

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.close()
            except OSError as exc:
                log.warning("recording close failed path=%s error=%s", self.path, exc)
