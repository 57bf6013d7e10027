"""Move bytes between a data connection and the local sshd with as little Python as possible.

One thread per direction, each blocked in the kernel: `os.splice` from the
source socket into a pipe and from the pipe into the destination socket, so
the bytes never enter Python (a large recv_into/sendall loop where splice is
not available). The device does no crypto and no per-packet work: a
keystroke costs two splice calls per direction.

End of stream in one direction is passed on as a half-close; an error in
either direction shuts both sockets down, which wakes the other thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import threading

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes per splice call: as much as the pipe holds
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
HAS_SPLICE = hasattr(os, "splice")


def _splice_pump(src: socket.socket, dst: socket.socket) -> None:
    read_end, write_end = os.pipe()
    try:
        with contextlib.suppress(OSError):  # a smaller pipe only means more calls
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
        source, sink = src.fileno(), dst.fileno()
        while True:
            moved = os.splice(source, write_end, CHUNK)
            if moved == 0:
                return
            while moved:
                moved -= os.splice(read_end, sink, moved)
    finally:
        os.close(read_end)
        os.close(write_end)


def _copy_pump(src: socket.socket, dst: socket.socket) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        count = src.recv_into(buf)
        if count == 0:
            return
        dst.sendall(view[:count])


def _pump(
    src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]
) -> None:
    """One direction until EOF (then half-close dst) or an error (then shut both down)."""
    try:
        (_splice_pump if HAS_SPLICE else _copy_pump)(src, dst)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    except OSError as exc:
        log.debug("data connection pump ended: %s", exc)
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


async def splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both directions ended; close both sockets."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [2]
    for sock in (a, b):
        sock.setblocking(True)

    def finished() -> None:
        left[0] -= 1
        if left[0] == 0 and not done.done():
            done.set_result(None)

    def run(src: socket.socket, dst: socket.socket) -> None:
        try:
            _pump(src, dst, (a, b))
        finally:
            loop.call_soon_threadsafe(finished)

    threads = [
        threading.Thread(target=run, args=(a, b), name="data-up", daemon=True),
        threading.Thread(target=run, args=(b, a), name="data-down", daemon=True),
    ]
    for thread in threads:
        thread.start()

    def close_both(_done: asyncio.Future[None]) -> None:  # once both threads let go
        a.close()
        b.close()

    done.add_done_callback(close_both)
    try:
        await asyncio.shield(done)
    finally:
        for sock in (a, b):  # wakes the threads if we were cancelled
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
