"""One asciicast v2 file per device session, under <data_dir>/recordings, mode 0600.

Output is recorded ("o" events, plus "r" on resize). Input ("i" events, what
the technician typed) only with `relay.record_input`: it shows what was typed
where the device echoes nothing, which is also why it is off by default:
passwords typed at prompts are captured. Once the file reaches
`relay.recording_max_bytes`, input recording stops and a marker event ("m")
says so; output is kept to the end.

Recording sits on the session's data path, so `output()` does no encoding:
it keeps a reference to the chunk. Chunks that arrive within `COALESCE`
seconds of the first one of a batch (up to `MAX_EVENT` bytes) become one
event, stamped with the batch's first arrival time; at 20 ms the merge is
invisible on playback, while bulk output costs one JSON encoding per
~megabyte instead of one per SSH packet. Encoded events are written to the
file in large binary writes, at the latest `FLUSH_INTERVAL` seconds after
the output arrived.

NUL bytes are left out of the recording: a terminal displays nothing for
them, and JSON needs six bytes for each (`\\u0000`), so binary output full of
them (a disk image, `head -c N /dev/zero`) would cost the relay far more to
record than to forward. Output is decoded as UTF-8 with `replace` for the
recording only; the technician gets the device's bytes unchanged.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from core.keys import ensure_private_dir

log = logging.getLogger(__name__)
FLUSH_INTERVAL = 1.0
COALESCE = 0.02
MAX_EVENT = 1024 * 1024
WRITE_CHUNK = 1024 * 1024
MAX_BUFFERS = 256  # well under IOV_MAX for one writev


@dataclass(frozen=True)
class RecordingOptions:
    record_input: bool = False
    max_bytes: int = 0  # input stops once the file is this big; 0: no cap


class Recording:
    """An open asciicast v2 file; every method is a no-op after close()."""

    def __init__(self, path: Path, fd: int, options: RecordingOptions | None = None) -> None:
        self.path = path
        self._fd: int | None = fd
        self.options = options or RecordingOptions()
        self.records_input = self.options.record_input
        self._size = 0  # bytes of encoded lines so far (written or queued)
        self._in_decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._start = time.monotonic()
        self._decoders: dict[int, codecs.IncrementalDecoder] = {}
        self._pending: list[bytes | str] = []  # the batch being collected, one stream
        self._pending_len = 0
        self._pending_at = 0.0
        self._pending_stream = 0
        self._out: list[bytes] = []  # encoded lines not yet written
        self._out_len = 0
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def create(
        cls,
        data_dir: Path,
        session_id: str,
        *,
        width: int,
        height: int,
        term: str,
        title: str,
        options: RecordingOptions | None = None,
    ) -> Recording:
        directory = data_dir / "recordings"
        ensure_private_dir(directory)
        path = directory / f"{session_id}.cast"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        header = {
            "version": 2,
            "width": max(width, 1),
            "height": max(height, 1),
            "timestamp": int(time.time()),
            "title": title,
            "env": {"TERM": term or "unknown"},
        }
        recording = cls(path, fd, options)
        recording._out.append((json.dumps(header) + "\n").encode())
        recording._out_len = recording._size = len(recording._out[0])
        recording._write()
        return recording

    def output(self, data: bytes | str, stream: int = 0) -> None:
        """Device output (bytes, or text already decoded); `stream` 1 is stderr."""
        if self._fd is None or not data:
            return
        now = time.monotonic()
        if self._pending and (
            stream != self._pending_stream
            or now - self._pending_at >= COALESCE
            or self._pending_len >= MAX_EVENT
            or isinstance(data, str) != isinstance(self._pending[0], str)
        ):
            self._emit()
        if not self._pending:
            self._pending_at = now
            self._pending_stream = stream
            self._schedule()
        self._pending.append(data)
        self._pending_len += len(data)

    def input(self, data: bytes | str) -> None:
        """What the technician typed (with `record_input`, until the size cap)."""
        if self._fd is None or not self.records_input or not data:
            return
        self._emit()  # keep the order: output that came before this keystroke first
        text = data if isinstance(data, str) else self._in_decoder.decode(data)
        if text and self.records_input:  # that output may just have reached the cap
            self._line(time.monotonic(), "i", text)
            self._schedule()

    def resize(self, width: int, height: int) -> None:
        if self._fd is None:
            return
        self._emit()
        self._line(time.monotonic(), "r", f"{width}x{height}")
        self._schedule()

    def close(self) -> None:
        if self._fd is None:
            return
        self._emit()
        for decoder in self._decoders.values():
            tail = decoder.decode(b"", True)
            if tail:
                self._line(time.monotonic(), "o", tail)
        self._write()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError as exc:
                log.warning("recording close failed path=%s error=%s", self.path, exc)

    # -- internals -----------------------------------------------------------

    def _emit(self) -> None:
        """Turn the pending batch into one event line."""
        if not self._pending:
            return
        chunks, self._pending, self._pending_len = self._pending, [], 0
        if isinstance(chunks[0], str):
            text = "".join(cast(list[str], chunks))
        else:
            decoder = self._decoders.get(self._pending_stream)
            if decoder is None:
                decoder = codecs.getincrementaldecoder("utf-8")("replace")
                self._decoders[self._pending_stream] = decoder
            raw = cast(list[bytes], chunks)
            data = b"".join(raw) if len(raw) > 1 else raw[0]
            text = decoder.decode(data.translate(None, b"\0"))
        if text:
            self._line(self._pending_at, "o", text)

    def _line(self, at: float, kind: str, data: str) -> None:
        line = json.dumps([round(at - self._start, 6), kind, data], ensure_ascii=False)
        encoded = line.encode("utf-8", "replace")
        self._out += (encoded, b"\n")
        self._out_len += len(encoded) + 1
        self._size += len(encoded) + 1
        cap = self.options.max_bytes
        if self.records_input and cap and self._size >= cap:
            self.records_input = False
            note = f"input recording stopped: the file reached {cap} bytes; output only from here"
            self._line(at, "m", note)
        if self._out_len >= WRITE_CHUNK or len(self._out) >= MAX_BUFFERS:
            self._write()

    def _write(self) -> None:
        if self._fd is None or not self._out:
            return
        buffers, self._out, self._out_len = self._out, [], 0
        try:
            written = os.writev(self._fd, buffers)
            rest = sum(map(len, buffers)) - written
            if rest:  # a short write (disk full soon, or a signal): finish it plainly
                view = memoryview(b"".join(buffers))[written:]
                while view:
                    view = view[os.write(self._fd, view) :]
        except OSError as exc:
            log.warning("recording stopped path=%s error=%s", self.path, exc)
            fd, self._fd = self._fd, None
            self._pending, self._pending_len = [], 0
            with contextlib.suppress(OSError):
                os.close(fd)

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): close() writes everything
        self._timer = loop.call_later(FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._emit()
        self._write()
