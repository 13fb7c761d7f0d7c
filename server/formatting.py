"""OpenAI response pieces for one choice: text, message, logprobs, finish reason, gate report."""

from __future__ import annotations

from typing import Any

from .serving import Choice, steering_report

__all__ = ["chat_choice", "chat_logprobs", "completion_choice", "completion_logprobs"]


def _tok(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def completion_logprobs(tokenizer, events) -> dict[str, Any] | None:
    events = [e for e in events if e.token_id is not None and e.logprob is not None]
    if not events:
        return None
    tokens, offsets, pos = [], [], 0
    for e in events:
        t = _tok(tokenizer, e.token_id)
        tokens.append(t)
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens, "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [{_tok(tokenizer, i): lp for i, lp in (e.top_logprobs or [])} for e in events],
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
    return {"index": c.index, "text": c.text, "logprobs": completion_logprobs(tokenizer, c.events),
            "finish_reason": c.finish_reason, "steering": steering_report(c.report)}


def chat_choice(tokenizer, c: Choice) -> dict[str, Any]:
    return {"index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(tokenizer, c.events), "finish_reason": c.finish_reason,
            "steering": steering_report(c.report)}
