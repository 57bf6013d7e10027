"""Group commit for the check-in fast path: one writer thread, one transaction per batch.

Handing every check-in to a thread of its own (`asyncio.to_thread`) cost more
CPU than the check-in itself: a future, a thread wake-up and a loop wake-up
each. Here the loop queues a job and the writer thread takes everything queued
so far, runs it in one transaction and hands all results back with one loop
wake-up. Under load, batches grow and those costs and the commit are shared;
a lone request still goes straight through.

A job must not raise for a refusal: it returns a value (the check-in fast path
returns None for "take the full path", having written nothing). If the batch's
transaction fails, each job is retried in a transaction of its own so one bad
job cannot fail the others; a job that still fails gets its own exception.
The thread ends after a few idle seconds and is started again on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, Engine

T = TypeVar("T")
MAX_BATCH = 64
IDLE_EXIT = 5.0

Job = Callable[[Connection], T]
_Item = tuple[Callable[[Connection], Any], asyncio.Future[Any]]


class BatchWriter(Generic[T]):
    def __init__(self, engine: Engine, *, name: str = "tracker-batch") -> None:
        self._engine = engine
        self._name = name
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False

    async def run(self, job: Job[T]) -> T:
        """Run `job` in the writer thread, in a transaction it may share with others."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((job, future))
        with self._lock:
            if not self._running:
                self._running = True
                threading.Thread(target=self._serve, name=self._name, daemon=True).start()
        return await future

    def _serve(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._running = False
                        return
                continue
            batch = [first]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._deliver(batch, self._run_batch(batch))

    def _run_batch(self, batch: list[_Item]) -> list[tuple[bool, Any]]:
        try:
            with self._engine.begin() as conn:
                return [(True, job(conn)) for job, _ in batch]
        except Exception as exc:
            if len(batch) == 1:
                return [(False, exc)]
        return [self._run_one(job) for job, _ in batch]

    def _run_one(self, job: Callable[[Connection], Any]) -> tuple[bool, Any]:
        try:
            with self._engine.begin() as conn:
                return True, job(conn)
        except Exception as exc:
            return False, exc

    @staticmethod
    def _deliver(batch: list[_Item], outcomes: list[tuple[bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_job, future), (ok, value) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(future.get_loop(), []).append((future, ok, value))
        for loop, results in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, results)


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():  # the request was cancelled (client went away)
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
