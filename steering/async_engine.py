"""An asyncio front for the decode engine: one background thread steps it, requests await their events.

Contract: `AsyncEngine(engine)` starts a daemon thread that calls `engine.step()` while there is work and
sleeps on a condition otherwise. `stream(request)` submits the request and yields its `TokenEvent`s as the
thread produces them (delivered to the caller's event loop with `call_soon_threadsafe`); if the consumer
stops early (client disconnect, `aclose`, task cancellation) the request is cancelled in the engine at
the next step boundary, so its slot frees within one decode step. `submit` raises `EngineFull` when
`max_waiting` sequences are already queued. `close()` stops the thread after the running requests finish
(or, with `drain=False`, after the step or job piece in progress, cancelling the rest).
`call(fn, ...)` runs other work that uses the model (prompt logprobs) on the same thread, so it never races
a step for the model's LoRA routes. Such a job is admitted like a request: it holds `weight` places of the
`max_waiting` queue (counted in `num_waiting`) until it ends, and `call` raises `EngineFull` when they are
not free. A job that is a generator runs one piece (one `next`) per turn of the thread, with a decode step
between two pieces, so other work delays a running stream by at most one piece per token (a piece of prompt
scoring: `prompt_logprobs.CHUNK` positions prefilled and scored).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from .engine import Engine
from .prompt_logprobs import PromptLogprobs
from .request import Request, SteeringParams, TokenEvent

__all__ = ["AsyncEngine", "EngineFull"]

CLOSE_TIMEOUT_S = 5.0  # the thread's step or scoring piece in progress; a daemon thread past this


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
        self._jobs: deque[_Job] = deque()  # FIFO; the head runs a piece per turn of the thread
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
        st = request.steering
        if st.adapter in self.engine.adapters:  # random's rate, top_k 0 for teachers only
            st.resolved(self.engine.adapters[st.adapter].manifest)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        """Queued sequences, and the places held by jobs (prompt scoring) not yet finished."""
        return self.engine.num_waiting + sum(job.weight for job in list(self._jobs))

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    async def ready(self) -> None:
        """Before serving: the compiled step's graphs are compiled (`Engine.warm_up`; nothing for the eager steps).
        Nothing to check: the gate is this process's own code (the vLLM engine checks that its plugin runs inside
        vLLM)."""
        await self.call(self.engine.warm_up)

    async def prompt_logprobs(self, prompts: list[list[int]], steering: SteeringParams, top_n: int = 0,
                              key: int = 0) -> list[PromptLogprobs]:
        """`Engine.prompt_logprobs` as a job of one place per prompt, run on the engine thread in pieces between
        decode steps (ValueError if it cannot run, EngineFull if the queue has no room)."""
        return await self.call(self.engine.prompt_logprobs_pieces, prompts, steering, top_n, key,
                               weight=len(prompts))

    async def call(self, fn, *args, weight: int = 1) -> Any:
        """Run `fn(*args)` on the engine thread and return its result (or raise its error); a generator runs a
        piece per turn, between decode steps, and its return value is the result. The job holds `weight`
        places of the queue until it ends; EngineFull at once if they are not free or the engine is stopping."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, args, weight, loop, loop.create_future())
        with self._wake:
            if self._stopping:
                raise EngineFull("the server is shutting down")
            if self.num_waiting + weight > self.max_waiting:
                raise EngineFull(f"{self.num_waiting} requests are already waiting: retry later")
            self._jobs.append(job)
            self._wake.notify()
        try:
            return await job.future
        finally:
            job.abandoned = True  # a caller gone (cancelled): the thread drops the job at its next piece

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self.engine.has_work and not self._jobs and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self.engine.has_work and not self._jobs:
                    return
                job = self._jobs[0] if self._jobs else None
            if job is not None and job.advance():
                with self._wake:
                    self._jobs.remove(job)
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
        """Stop the thread: with `drain`, after the running requests and jobs finish; without, after the step or
        job piece in progress (every request cancelled, every job refused with EngineFull). Waits up to
        `timeout` seconds for the thread; call it off the event loop (`asyncio.to_thread`), it blocks."""
        self.stop(drain)
        self._thread.join(timeout)

    async def aclose(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """`close(drain=False)` for an event loop: the wait for the thread runs in a worker thread."""
        await asyncio.to_thread(self.close, False, timeout)

    def stop(self, drain: bool = True) -> None:
        """`close` without the wait: safe on the event loop and from a signal handler."""
        with self._wake:
            self._stopping = True
            if not drain:
                for rid in list(self._queues):
                    self.engine.cancel(rid)
                for job in self._jobs:  # each ends at its next turn (the one in progress after its piece)
                    job.abandoned = True
            self._wake.notify()


@dataclass(eq=False)
class _Job:
    """Work for the engine thread: `fn(*args)`, run whole, or a piece per turn if it returns a generator."""

    fn: Any
    args: tuple
    weight: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    gen: Iterator | None = None
    abandoned: bool = False

    def advance(self) -> bool:
        """Run one piece; True when the job has ended (its result or error handed to the caller)."""
        if self.abandoned:
            if self.gen is not None:
                self.gen.close()
            self.settle(None, EngineFull("the server is shutting down"))
            return True
        try:
            if self.gen is None:
                out = self.fn(*self.args)
                if not inspect.isgenerator(out):
                    self.settle(out, None)
                    return True
                self.gen = out
            next(self.gen)
            return False
        except StopIteration as done:
            self.settle(done.value, None)
        except Exception as e:  # handed to the caller
            self.settle(None, e)
        return True

    def settle(self, result: Any, error: BaseException | None) -> None:
        future = self.future

        def settle() -> None:
            if future.done():  # the caller went away
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop has closed
            self.loop.call_soon_threadsafe(settle)

