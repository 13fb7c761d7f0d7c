"""From an OpenAI request to engine requests and back: steering resolution, limits, choices, chunks.

Contract: `plan(...)` turns a validated request into one engine `Request` per choice (prompt x n) or raises
`ApiError` (status + OpenAI error type + message). `admit` opens every choice in the engine before any
response is sent (all or none), `stream_all` yields (choice, event) as events arrive and cancels every
unfinished choice if the consumer stops, or when the server's drain ends.
Choice i of a request with `seed` s samples with seed s + i, so n > 1 gives different, reproducible choices.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from reasonmaxxer.steering.async_engine import EngineFull
from reasonmaxxer.steering.prompt_logprobs import PromptLogprobs
from reasonmaxxer.steering.request import GateReport, Request, SteeringParams, TokenEvent, UnknownAdapter
from reasonmaxxer.steering.sampling import SamplingParams

__all__ = ["ApiError", "Choice", "Echo", "RequestFailed", "ShuttingDown", "admit", "attach_echo", "check_model",
           "check_token_ids", "encode", "json_number", "plan", "release", "stream_all", "usage"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


@dataclass
class Echo:
    """`echo: true`: the prompt's text, shown before the completion, and its logprobs when asked."""

    text: str
    scores: PromptLogprobs | None = None


@dataclass
class Choice:
    index: int
    prompt_tokens: int
    request: Request
    events: list[TokenEvent]
    echo: Echo | None = None
    iterator: Any = None  # its events, once admitted (`admit`)
    generate: bool = True  # False for max_tokens 0 (echo only): nothing is generated, finish_reason "length"
    idle_report: GateReport | None = None  # the gate report of a choice that generates nothing

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish_reason(self) -> str | None:
        if not self.generate:
            return "length"
        return self.events[-1].finish_reason if self.events else None

    @property
    def report(self) -> GateReport | None:
        return self.events[-1].report if self.events else self.idle_report

    @property
    def delivered(self) -> tuple[int, int]:
        """(tokens, gate fired) of the events received so far: what a choice cut short has delivered."""
        tokens = [e for e in self.events if e.token_id is not None]
        return len(tokens), sum(1 for e in tokens if e.fired)


def check_model(model: str, served_name: str, adapters: Sequence[str]) -> None:
    """A model id must be the served model's or an adapter's (404 naming the ones there are)."""
    if model != served_name and model not in adapters:
        known = ", ".join([served_name, *adapters])
        raise ApiError(404, f"The model '{model}' does not exist. Available models: {known}", code="model_not_found",
                       param="model")


def resolve_steering(model: str, served_name: str, adapters: Sequence[str], opts) -> SteeringParams:
    """The steering of a request: by model id (base or adapter name), overridden by `steering` (the HTTP object,
    whose fields `SteeringParams` validates)."""
    check_model(model, served_name, adapters)
    adapter, mode = (None, "off") if model == served_name else (model, "gated")
    if opts is None:
        return SteeringParams(adapter=adapter, mode=mode)
    if opts.adapter is not None:
        if opts.adapter not in adapters:
            raise ApiError(400, str(UnknownAdapter(opts.adapter, adapters)), param="steering")
        adapter, mode = opts.adapter, "gated"
    try:
        return SteeringParams(adapter=adapter, mode=opts.mode or mode, threshold=opts.threshold, top_k=opts.top_k,
                              trace=opts.trace, rate=opts.rate, logprobs=opts.logprobs)
    except ValueError as e:
        raise ApiError(400, str(e), param="steering") from e


def encode(tokenizer, text: str) -> list[int]:
    """A text prompt's token ids, as the completions route tokenizes it (the tokenizer's special tokens)."""
    return tokenizer(text)["input_ids"]


def check_token_ids(prompts: list[list[int]], vocab: int, param: str = "prompt") -> None:
    """Token-id prompts must hold ids in [0, vocab): an id outside would fail the engine's step."""
    for ids in prompts:
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is out of range: this model's token ids are 0 to {vocab - 1}",
                           param=param)


def check_limits(settings, n: int, max_tokens: int, stop: list[str], top_logprobs: int | None) -> None:
    if n > settings.max_n:
        raise ApiError(400, f"n is {n}; this server allows at most {settings.max_n}", param="n")
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                       param="max_tokens")
    if len(stop) > settings.max_stop:
        raise ApiError(400, f"{len(stop)} stop strings; this server allows at most {settings.max_stop}", param="stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must not be empty", param="stop")
    if top_logprobs is not None and top_logprobs > settings.max_top_logprobs:
        raise ApiError(400, f"{top_logprobs} top logprobs asked; this server allows at most "
                       f"{settings.max_top_logprobs}", param="top_logprobs")


def plan(body, prompts: list[list[int]], max_tokens: int, logprobs: int | None, steering: SteeringParams,
         context: int) -> list[Choice]:
    choices = []
    for p, ids in enumerate(prompts):
        if not ids:
            raise ApiError(400, "the prompt is empty: send some text", param="prompt")
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt has {len(ids)} "
                           f"and max_tokens asks for {max_tokens}: shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        for j in range(body.n):
            i = p * body.n + j
            sp = SamplingParams(
                max_tokens=max(1, max_tokens), temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                min_p=body.min_p, seed=None if body.seed is None else body.seed + i, stop=body.stop_list,
                ignore_eos=body.ignore_eos, logprobs=logprobs,
            )
            choices.append(Choice(i, len(ids), Request(list(ids), sp, steering), [], generate=max_tokens > 0))
    return choices


async def attach_echo(engine, tokenizer, body, choices: list[Choice],
                      prompts: list[list[int]]) -> list[PromptLogprobs]:
    """Give each choice its prompt's text and, with `logprobs`, the prompt logprobs of the model the request
    is served as (scored once per prompt, shared by its n choices). Returns the scores (one per prompt, none
    without logprobs); ValueError if the engine cannot."""
    texts = [p if isinstance(p, str) else await asyncio.to_thread(tokenizer.decode, ids)
             for p, ids in zip(body.prompts, prompts, strict=True)]  # once per prompt, not per choice
    scores: list[PromptLogprobs | None] = [None] * len(prompts)
    if body.logprobs is not None:
        request = choices[0].request
        scores = await engine.prompt_logprobs(prompts, request.steering, body.logprobs, request.gate_key)
    for c in choices:
        p = c.index // body.n
        if not c.generate:
            c.idle_report = _idle_report(engine, c.request.steering)
        c.echo = Echo(texts[p], scores[p])
    return [sc for sc in scores if sc is not None]


class ShuttingDown(Exception):
    """The server is shutting down: a request still running at the end of the drain ends with this."""


class RequestFailed(Exception):
    """The engine could not run this request (the others went on)."""


def admit(engine, choices: list[Choice]) -> None:
    """Admit every choice that generates, before any response is sent: a request larger than the queue is a
    400, a full queue a 503, a request the engine cannot run a 400. All or none: on a refusal the choices
    admitted so far are released."""
    running = [c for c in choices if c.generate]
    if len(running) > engine.max_waiting:
        raise ApiError(400, f"this request asks for {len(running)} sequences (prompts x n) but the server queues "
                       f"at most {engine.max_waiting}: lower n or send fewer prompts", param="n")
    if engine.num_waiting + len(running) > engine.max_waiting:
        raise ApiError(503, f"{engine.num_waiting} requests are already waiting: retry later", "server_error",
                       code="overloaded")
    try:
        for c in running:
            c.iterator = engine.open(c.request)
    except EngineFull as e:
        release(engine, running)
        raise ApiError(503, str(e), "server_error", code="overloaded") from e
    except ValueError as e:
        release(engine, running)
        raise ApiError(400, str(e), param="steering") from e


def release(engine, choices: list[Choice]) -> None:
    """Give back what `admit` took for choices that did not finish (idempotent)."""
    for c in choices:
        if c.iterator is not None and c.finish_reason is None:
            engine.release(c.request)


async def stream_all(engine, choices: list[Choice], on_cancel=None,
                     stop: asyncio.Event | None = None) -> AsyncIterator[tuple[Choice, TokenEvent]]:
    """Events of every admitted choice as they arrive. If the consumer stops, unfinished choices are cancelled
    (`on_cancel(n)` is told how many); when `stop` is set (the end of a drain) this raises ShuttingDown; an
    "error" event (the engine could not run a choice) raises RequestFailed."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    choices = [c for c in choices if c.iterator is not None]

    async def pump(choice: Choice) -> None:
        try:
            async for event in choice.iterator:
                choice.events.append(event)
                await queue.put((choice, event))
        except Exception as e:  # handed to the consumer
            await queue.put((choice, e))
        finally:
            await queue.put((choice, done))

    async def watch_stop() -> None:
        await stop.wait()
        await queue.put((None, ShuttingDown("the server is shutting down: retry on another replica or later")))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    if stop is not None:
        tasks.append(asyncio.create_task(watch_stop()))
    remaining = len(choices)
    try:
        while remaining:
            choice, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            elif item.finish_reason == "error":
                raise RequestFailed(f"the engine could not run this request: {item.error}")
            else:
                yield choice, item
    finally:
        # No await before the cancellations: under anyio a cancelled scope re-raises at every await.
        unfinished = sum(1 for c in choices if c.finish_reason is None)
        for t in tasks:
            t.cancel()
        release(engine, choices)
        if unfinished and on_cancel is not None:
            on_cancel([c for c in choices if c.finish_reason is None])
        await asyncio.gather(*tasks, return_exceptions=True)


def usage(choices: list[Choice], prompt_counts: dict[int, int]) -> dict[str, Any]:
    """OpenAI's usage with `steering` totals: a finished choice by its gate report, one cut short (the drain
    ended it) by the tokens it delivered, as /metrics counts them."""
    completion = fired = 0
    for c in choices:
        if c.report is not None:
            completion, fired = completion + c.report.tokens, fired + c.report.gate_fired
        else:
            n, f = c.delivered
            completion, fired = completion + n, fired + f
    prompt = sum(prompt_counts.values())
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "steering": {"tokens": completion, "gate_fired": fired, "fire_rate": fired / completion if completion else 0.0},
    }


def _idle_report(engine, st: SteeringParams) -> GateReport:
    """The gate report of a choice that generates nothing: its steering resolved against its adapter."""
    adapter = engine.adapters.get(st.adapter) if st.adapter else None
    return st.resolved(adapter.manifest if adapter is not None else None).report()


def steering_report(report: GateReport | None, echo: Echo | None = None) -> dict[str, Any] | None:
    """The gate report of a choice; with echo logprobs, also where the correction applied in the prompt."""
    if report is None:
        return None
    out = report.to_dict()
    if echo is not None and echo.scores is not None:
        out["prompt_tokens_scored"], out["prompt_gate_fired"] = echo.scores.scored, echo.scores.fired
    if out.get("threshold") is not None:
        out["threshold"] = json_number(out["threshold"])
    return out


def json_number(x: float | None) -> float | str | None:
    """A number for a JSON body: an infinite one (a gate that never fires) as the string "inf", as everywhere in
    this API (JSON has no infinity)."""
    return "inf" if x is not None and math.isinf(x) else x
