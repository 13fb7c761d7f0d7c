"""An asyncio front for the decode engine: one background thread steps it, requests await their events.

Contract: `AsyncEngine(engine)` starts a daemon thread that calls `engine.step()` while there is work and
sleeps on a condition otherwise. `stream(request)` submits the request and yields its `TokenEvent`s as the
thread produces them (delivered to the caller's event loop with `call_soon_threadsafe`); if the consumer
stops early (client disconnect, `aclose`, task cancellation) the request is cancelled in the engine at
the next step boundary, so its slot frees within one decode step. `submit` raises `EngineFull` when
`max_waiting` requests are already queued. `close()` stops the thread after the running requests finish
(or at once with `drain=False`). `call(fn, ...)` runs other work that uses the model (prompt logprobs) on
the same thread between two steps, so it never races a step for the model's LoRA routes.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._jobs: list[tuple[Any, tuple, asyncio.AbstractEventLoop, asyncio.Future]] = []
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
        from .rows import GateSettings

        st = request.steering
        if st.adapter in self.engine.adapters:  # random's rate, top_k 0 for teachers only
            GateSettings.of(st, self.engine.adapters[st.adapter])

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    async def ready(self) -> None:
        """Nothing to check before serving: the gate is this process's own code (the vLLM engine checks that its
        plugin runs inside vLLM)."""

    async def prompt_logprobs(self, prompts: list[list[int]], steering, top_n: int = 0, source: str = "steered",
                              key: int = 0) -> list:
        """`Engine.prompt_logprobs`, run on the engine thread between two steps (ValueError if it cannot run)."""
        return await self.call(self.engine.prompt_logprobs, prompts, steering, top_n, source, key)

    async def call(self, fn, *args) -> Any:
        """Run `fn(*args)` on the engine thread between two steps and return its result (or raise its error)."""
        if self._stopping:
            raise EngineFull("the server is shutting down")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._wake:
            self._jobs.append((fn, args, loop, future))
            self._wake.notify()
        return await future

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.engine.has_work and not self._jobs and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self.engine.has_work and not self._jobs:
                    return
                jobs, self._jobs = self._jobs, []
            for job in jobs:
                _run_job(*job)
            if not self.engine.has_work:
                continue
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

    def open(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Admit `request` now (EngineFull or ValueError here, before a response is sent) and return the
        iterator of its events; `release(request)` must follow, whether or not it was iterated."""
        return self._events(request, self.submit(request))

    def release(self, request: Request) -> None:
        """Cancel `request` in the engine unless it finished (idempotent)."""
        if self._queues.pop(request.request_id, None) is not None:
            self.engine.cancel(request.request_id)
            with self._wake:
                self._wake.notify()

    async def stream(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Events of `request` in order; cancels it in the engine if the consumer stops early."""
        async for event in self.open(request):
            yield event

    async def _events(self, request: Request, queue: asyncio.Queue) -> AsyncIterator[TokenEvent]:
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


def _run_job(fn, args: tuple, loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
    try:
        result, error = fn(*args), None
    except Exception as e:  # handed to the caller
        result, error = None, e

    def settle() -> None:
        if future.done():  # the caller went away
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop has closed
        loop.call_soon_threadsafe(settle)
