"""An asyncio front for the decode engine: one background thread steps it, requests await their events.

Contract: `AsyncEngine(engine)` starts a daemon thread that calls `engine.step()` while there is work and
sleeps on a condition otherwise. `stream(request)` submits the request and yields its `TokenEvent`s as the
thread produces them (delivered to the caller's event loop with `call_soon_threadsafe`); if the consumer
stops early (client disconnect, `aclose`, task cancellation) the request is cancelled in the engine at
the next step boundary, so its slot frees within one decode step. `submit` raises `EngineFull` when
`max_waiting` requests are already queued. `close()` stops the thread after the running requests finish
(or at once with `drain=False`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

from .engine import Engine
from .request import Request, TokenEvent

__all__ = ["AsyncEngine", "EngineFull"]


class EngineFull(RuntimeError):
    """The waiting queue is full: try again later (HTTP 503)."""


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting: int = 256):
        self.engine = engine
        self.max_waiting = max_waiting
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="reasonmaxxer-engine", daemon=True)
        self._thread.start()

    # ---- what the server needs besides stream(): the same on every backend ----------------------------
    @property
    def adapters(self) -> dict:
        return self.engine.adapters

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def add_adapter(self, adapter) -> None:
        self.engine.add_adapter(adapter)

    def remove_adapter(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def check(self, request: Request) -> None:
        """Raise ValueError if this engine cannot run `request` as asked (`Engine.submit` checks the rest)."""
        from .request import random_rate

        st = request.steering
        if st.mode == "random" and st.adapter in self.engine.adapters:
            random_rate(st, self.engine.adapters[st.adapter].manifest)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.engine.has_work and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self.engine.has_work:
                    return
            try:
                events = self.engine.step()
            except BaseException as e:  # deliver to every waiter, keep serving
                self._fail_all(e)
                continue
            for event in events:
                self._deliver(event.request_id, event)

    def _deliver(self, request_id: str, item: Any) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._queues):
            self.engine.cancel(rid)
            self._deliver(rid, error)

    def submit(self, request: Request) -> asyncio.Queue:
        if self._stopping:
            raise EngineFull("the server is shutting down")
        if self.engine.num_waiting >= self.max_waiting:
            raise EngineFull(f"{self.engine.num_waiting} requests are already waiting: retry later")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request.request_id] = (asyncio.get_running_loop(), queue)
        try:
            self.engine.submit(request)
        except BaseException:
            self._queues.pop(request.request_id, None)
            raise
        with self._wake:
            self._wake.notify()
        return queue

    async def stream(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Events of `request` in order; cancels it in the engine if the consumer stops early."""
        queue = self.submit(request)
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise RuntimeError(f"the engine failed: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request.request_id, None)
            if not finished:
                self.engine.cancel(request.request_id)
                with self._wake:
                    self._wake.notify()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        if not drain:
            for rid in list(self._queues):
                self.engine.cancel(rid)
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
