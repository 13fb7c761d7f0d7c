"""Routes: thin handlers that fetch the server state from `app.state` and hand work to `serving.py`.

Contract: `/v1/completions` and `/v1/chat/completions` answer in OpenAI's shapes; every choice carries a
`steering` gate report and `usage.steering` sums them; streams are server-sent events ending with
`data: [DONE]`, each choice's last chunk carrying its `steering` and, with `stream_options.include_usage`,
a last chunk with `usage`. A client that disconnects cancels its generation. Logprobs report the steered
distribution (the one sampled from) unless `steering.logprobs` is "base".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from reasonmaxxer import __version__
from reasonmaxxer.steering.async_engine import EngineFull

from .formatting import chat_choice, completion_choice
from .protocol import ChatCompletionRequest, CompletionRequest, make_id, now
from .serving import (
    ApiError,
    RequestFailed,
    ShuttingDown,
    admit,
    attach_echo,
    check_limits,
    check_token_ids,
    encode,
    plan,
    release,
    resolve_steering,
    stream_all,
    usage,
)
from .streaming import EngineStream, sse

router = APIRouter()


def _state(request: Request):
    return request.app.state.server


@router.head("/health", include_in_schema=False)
@router.get("/health")
async def health(request: Request):
    """200 while serving; 503 {"status": "draining"} from the first SIGTERM on, so that a load balancer stops
    sending new requests here while the running ones finish."""
    s = _state(request)
    body = {"status": "draining" if s.draining else "ok", "running": s.engine.num_running,
            "waiting": s.engine.num_waiting}
    return JSONResponse(body, status_code=503 if s.draining else 200)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    s = _state(request)
    created = now()
    data = [{"id": s.served_name, "object": "model", "created": created, "owned_by": "reasonmaxxer"}]
    data += [{"id": a, "object": "model", "created": created, "owned_by": "reasonmaxxer", "parent": s.served_name}
             for a in s.adapters]
    return {"object": "list", "data": data}


def _logprobs_n(body) -> int | None:
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def _prepare(request: Request, body, prompts: list[list[int]], max_tokens: int):
    s = _state(request)
    steering = resolve_steering(body.model, s.served_name, s.adapters, body.steering)
    n_top = _logprobs_n(body)
    check_limits(s.settings, body.n, max_tokens, body.stop_list, n_top)
    choices = plan(body, prompts, max_tokens, n_top, steering, s.engine.max_model_len)
    try:
        s.engine.check(choices[0].request)
    except ValueError as e:
        raise ApiError(400, str(e), param="steering") from e
    return choices


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    s = _state(request)
    prompts = [p if isinstance(p, list) else await asyncio.to_thread(encode, s.tokenizer, p) for p in body.prompts]
    check_token_ids(prompts, len(s.tokenizer))
    default = min(16, s.settings.max_tokens_limit)  # OpenAI's default, within this server's limit
    choices = _prepare(request, body, prompts, default if body.max_tokens is None else body.max_tokens)
    if body.echo:  # prompt scoring is engine work: admitted first, a place per prompt while it runs
        _refuse_if_draining(s)
        try:
            scores = await attach_echo(s.engine, s.tokenizer, body, choices, prompts)
        except ValueError as e:
            raise ApiError(400, str(e), param="echo") from e
        except EngineFull as e:
            reason = "shutting_down" if s.draining else "overloaded"
            s.metrics.rejected.labels(reason).inc()
            raise ApiError(503, str(e), "server_error", code=reason) from e
        for sc in scores:
            s.metrics.observe_echo(s.served_name, choices[0].request.steering, sc)
    return await _respond(request, body, choices, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = _state(request)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        ids = list(await asyncio.to_thread(s.tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                           tokenize=True, return_dict=False))
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from e
    context = s.engine.max_model_len
    max_tokens = body.token_budget or max(1, min(s.settings.max_tokens_limit, context - len(ids)))
    choices = _prepare(request, body, [ids], max_tokens)
    return await _respond(request, body, choices, chat=True)


def _refuse_if_draining(s) -> None:
    if s.draining:
        s.metrics.rejected.labels("shutting_down").inc()
        raise ApiError(503, "the server is shutting down: retry on another replica or later", "server_error",
                       code="shutting_down")


def _admit(s, choices) -> None:
    """Admission, before any response: 503 while draining or with the queue full (counted as rejections)."""
    _refuse_if_draining(s)
    try:
        admit(s.engine, choices)
    except ApiError as e:
        if e.status == 503:
            s.metrics.rejected.labels("overloaded").inc()
        raise


async def _respond(request: Request, body, choices, chat: bool):
    s = _state(request)
    _admit(s, choices)
    if body.stream:
        return EngineStream(sse(request, body, choices, chat), lambda: release(s.engine, choices),
                            media_type="text/event-stream")
    start, endpoint = time.perf_counter(), "chat" if chat else "completions"
    first: list[float] = []
    running = [c for c in choices if c.generate]
    cancelled = functools.partial(s.metrics.observe_cancelled, s.served_name)
    try:
        async for _choice, event in _watch_disconnect(request, stream_all(s.engine, running, cancelled, s.stop)):
            if not first and event.token_id is not None:
                first.append(time.perf_counter() - start)
                s.metrics.ttft.labels(endpoint).observe(first[0])
    except ShuttingDown as e:
        raise ApiError(503, str(e), "server_error", code="shutting_down") from e
    except RequestFailed as e:
        raise ApiError(500, str(e), "server_error", code="engine_error") from e
    finally:
        release(s.engine, choices)
    s.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    for c in running:
        s.metrics.observe_choice(s.served_name, c.report)
    return JSONResponse(_body(s, body, choices, chat))


async def _watch_disconnect(request: Request, events):
    """Pass events through; if the client goes away, stop (cancelling the generation) and answer 499."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    iterator = events.__aiter__()
    try:
        while True:
            nxt = asyncio.ensure_future(iterator.__anext__())
            await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()  # runs the generator's cleanup: the engine cancels its requests
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
                await iterator.aclose()
                raise ApiError(499, "client disconnected")
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    finally:
        watcher.cancel()


def _body(s, body, choices, chat: bool) -> dict[str, Any]:
    prompts = {c.index // body.n: c.prompt_tokens for c in choices}
    fmt = chat_choice if chat else completion_choice
    return {
        "id": make_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion" if chat else "text_completion",
        "created": now(), "model": body.model, "choices": [fmt(s.tokenizer, c) for c in choices],
        "usage": usage(choices, prompts),
    }
