"""The engine interfaces, named once: what a stepping engine offers, and what the server drives.

Contract:
- `StepEngine`: requests in, events out, one step at a time, on the caller's thread (`Engine`, the transformers
  engine; `VllmOfflineEngine`, vLLM's offline engine). Rollouts, fits and benchmarks are typed against it.
- `ServingEngine`: what the server needs, async and admission-controlled (`AsyncEngine` around an `Engine`;
  `VllmEngine`). `open` admits a request and returns its events, `release` gives back what `open` took;
  `prompt_logprobs` scores prompts (echo); `describe` says what the banner shows (device, dtype, kernels), so the
  server never reaches into an engine's internals. The server is typed against it (`ServerState.engine`).
Both are `typing.Protocol`s checked at run time by attribute names (`isinstance(engine, ServingEngine)`); a test
checks every engine against its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol, runtime_checkable

from .prompt_logprobs import PromptLogprobs
from .request import Request, SteeringParams, TokenEvent

__all__ = ["ServingEngine", "StepEngine"]


@runtime_checkable
class StepEngine(Protocol):
    """Decode requests one step at a time; the caller's thread runs every step."""

    tokenizer: Any
    max_model_len: int

    @property
    def adapters(self) -> Mapping[str, Any]: ...  # registered name -> correction source

    @property
    def has_work(self) -> bool: ...

    def add_adapter(self, adapter: Any) -> None: ...  # validate against the served model, then register

    def remove_adapter(self, name: str) -> None: ...

    def submit(self, request: Request) -> str: ...  # the request id; ValueError if it cannot run

    def cancel(self, request_id: str) -> None: ...  # its last event: finish_reason "cancelled"

    def step(self) -> list[TokenEvent]: ...  # one token for every running request


@runtime_checkable
class ServingEngine(Protocol):
    """What the OpenAI server drives: admission (`max_waiting`), async events, prompt scoring, a clean stop."""

    max_waiting: int

    @property
    def adapters(self) -> Mapping[str, Any]: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...  # queued sequences and jobs, as counted against max_waiting

    def add_adapter(self, adapter: Any) -> None: ...

    def remove_adapter(self, name: str) -> None: ...

    def check(self, request: Request) -> None: ...  # ValueError (HTTP 400) if it cannot run as asked

    def open(self, request: Request) -> AsyncIterator[TokenEvent]: ...  # admitted now (EngineFull: no room)

    def release(self, request: Request) -> None: ...  # give back what `open` took (idempotent)

    async def prompt_logprobs(self, prompts: list[list[int]], steering: SteeringParams, top_n: int = 0,
                              key: int = 0) -> list[PromptLogprobs]: ...

    async def ready(self) -> None: ...  # checks before serving (vLLM: the plugin runs in its engine)

    def describe(self) -> dict[str, Any]: ...  # {"device", "dtype", "kernels", "step"} for the banner

    def stop(self, drain: bool = True) -> None: ...  # stop taking work (drain: let the running finish)

    async def aclose(self) -> None: ...  # stop and join, off the event loop
