"""OpenAI response pieces for one choice: text, message, logprobs, finish reason, gate report."""

from __future__ import annotations

from typing import Any

from reasonmaxxer.steering.prompt_logprobs import PromptLogprobs

from .serving import Choice, steering_report

__all__ = ["chat_choice", "chat_logprobs", "completion_choice", "completion_logprobs"]


def _tok(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, events, echo: PromptLogprobs | None = None,
                        start: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs over the echoed prompt (`echo`: its first token has null logprob and
    top_logprobs) then the generated tokens; `text_offset` counts characters from `start`."""
    events = [e for e in events if e.token_id is not None and e.logprob is not None]
    if not events and echo is None:
        return None
    ids = (echo.token_ids if echo else []) + [e.token_id for e in events]
    logprobs = (echo.logprobs if echo else []) + [e.logprob for e in events]
    tops = (echo.top if echo else []) + [e.top_logprobs or [] for e in events]
    tokens, offsets, pos = [], [], start
    for token_id in ids:
        t = _tok(tokenizer, token_id)
        tokens.append(t)
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens, "token_logprobs": logprobs,
        "top_logprobs": [None if top is None else {_tok(tokenizer, i): lp for i, lp in top} for top in tops],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, events) -> dict[str, Any] | None:
    events = [e for e in events if e.token_id is not None and e.logprob is not None]
    if not events:
        return None

    def entry(token_id: int, lp: float) -> dict[str, Any]:
        t = _tok(tokenizer, token_id)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [{**entry(e.token_id, e.logprob),
                         "top_logprobs": [entry(i, lp) for i, lp in (e.top_logprobs or [])]} for e in events]}


def completion_choice(tokenizer, c: Choice) -> dict[str, Any]:
    echo = c.echo.text if c.echo else ""
    logprobs = completion_logprobs(tokenizer, c.events, c.echo.scores if c.echo else None)
    return {"index": c.index, "text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason,
            "steering": steering_report(c.report, c.echo)}


def chat_choice(tokenizer, c: Choice) -> dict[str, Any]:
    return {"index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(tokenizer, c.events), "finish_reason": c.finish_reason,
            "steering": steering_report(c.report)}
