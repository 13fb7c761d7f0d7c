"""Server-sent events for `stream: true`: chunks as tokens arrive, the gate report in each choice's last chunk,
an optional usage chunk, then `data: [DONE]`. A stream that cannot go on after its 200 (the engine could not
run it, the drain ended, an internal error) ends with its usage chunk if asked (the tokens it delivered), one
event in OpenAI's error shape (`{"error": {...}}`), then `data: [DONE]`. If the client goes away, Starlette
cancels this generator and `stream_all` cancels the generations (their slots free within one decode step)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from .formatting import chat_logprobs, completion_logprobs
from .protocol import error_body, make_id, now
from .serving import RequestFailed, ShuttingDown, steering_report, stream_all, usage

__all__ = ["EngineStream", "sse"]


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def sse(request, body, choices, chat: bool) -> AsyncIterator[str]:
    s = request.app.state.server
    endpoint = "chat" if chat else "completions"
    head = {"id": make_id("chatcmpl" if chat else "cmpl"), "object": "chat.completion.chunk" if chat
            else "text_completion", "created": now(), "model": body.model}
    start, first = time.perf_counter(), True
    if chat:
        for c in choices:
            yield _event({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                               "logprobs": None, "finish_reason": None}]})
    for c in choices:
        if c.echo is not None:
            yield _event({**head, "choices": [_echo_piece(s, c)]})
    cancelled = functools.partial(s.metrics.observe_cancelled, s.served_name)
    events = stream_all(s.engine, [c for c in choices if c.generate], cancelled, s.stop)
    failure = None
    try:
        async for choice, event in _until_failure(events):
            if isinstance(event, dict):  # the stream cannot go on: its last event, in OpenAI's error shape
                failure = event
                break
            if first and event.token_id is not None:
                first = False
                s.metrics.ttft.labels(endpoint).observe(time.perf_counter() - start)
            if not (event.text or event.finished or event.logprob is not None):
                continue
            piece: dict[str, Any] = {"index": choice.index, "finish_reason": event.finish_reason}
            if chat:
                piece["delta"] = {"content": event.text} if event.text else {}
                piece["logprobs"] = chat_logprobs(s.tokenizer, [event])
            else:
                piece["text"] = event.text
                piece["logprobs"] = completion_logprobs(s.tokenizer, [event])
            if event.finished:
                piece["steering"] = steering_report(event.report, choice.echo)
                s.metrics.observe_choice(s.served_name, event.report)
            yield _event({**head, "choices": [piece]})
    finally:
        await events.aclose()  # a client that left: cancel its generations now
    s.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    if body.stream_options is not None and body.stream_options.include_usage:  # the tokens delivered, cut or not
        prompts = {c.index // body.n: c.prompt_tokens for c in choices}
        yield _event({**head, "choices": [], "usage": usage(choices, prompts)})
    if failure is not None:
        yield _event(failure)
    yield "data: [DONE]\n\n"


def _echo_piece(s, c) -> dict[str, Any]:
    """The first chunk of an echoed choice: the prompt (and its logprobs); the last too if nothing is generated."""
    piece: dict[str, Any] = {"index": c.index, "text": c.echo.text,
                             "logprobs": completion_logprobs(s.tokenizer, [], c.echo.scores),
                             "finish_reason": None if c.generate else c.finish_reason}
    if not c.generate:
        piece["steering"] = steering_report(c.report, c.echo)
    return piece


async def _until_failure(events):
    """The events, then (if the engine fails, the request cannot run, or the drain ends) one error body."""
    try:
        async for item in events:
            yield item
    except ShuttingDown as e:
        yield None, error_body(str(e), "server_error", code="shutting_down")
    except RequestFailed as e:
        yield None, error_body(str(e), "server_error", code="engine_error")
    except Exception as e:  # after the 200 nothing else can tell the client
        yield None, error_body(f"internal error: {type(e).__name__}: {e}", "server_error", code="internal_error")


class EngineStream(StreamingResponse):
    """A streaming response whose admitted choices are released when it ends, whatever happened (even if its
    body never started: a client gone before the first byte)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
