"""A Python client for any ReasonMaxxer server, over the official `openai` SDK.

Contract: `SteeringClient(base_url, api_key)` wraps `openai.OpenAI`. `chat(...)` / `complete(...)` take
`adapter`, `mode`, `threshold`, `top_k`, `trace` and send them in the `steering` body field (through the
SDK's `extra_body`), or nothing at all when no steering is asked for, so the same calls work against a
plain OpenAI-compatible server (vLLM's own, for a base arm). Results are `Answer`s: the text, finish
reason, token counts and, from our servers, the gate report (`None` from servers that send none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import openai

__all__ = ["Answer", "SteeringClient", "gate_report"]


def gate_report(obj: Any) -> dict[str, Any] | None:
    """The `steering` report of a choice (or usage) object of the SDK, or None."""
    extra = getattr(obj, "model_extra", None) or {}
    return extra.get("steering")


@dataclass
class Answer:
    text: str
    finish_reason: str | None
    completion_tokens: int
    steering: dict[str, Any] | None = None
    raw: Any = field(default=None, repr=False)

    @property
    def gate_fired(self) -> int:
        return int(self.steering["gate_fired"]) if self.steering else 0

    @property
    def fire_rate(self) -> float:
        return float(self.steering["fire_rate"]) if self.steering else 0.0


class SteeringClient:
    def __init__(self, base_url: str, api_key: str = "none", timeout: float = 600.0, max_retries: int = 2):
        self.openai = openai.OpenAI(base_url=base_url.rstrip("/") + "/v1" if not base_url.rstrip("/").endswith("/v1")
                                    else base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)

    def models(self) -> list[str]:
        return [m.id for m in self.openai.models.list()]

    @staticmethod
    def _steering(adapter, mode, threshold, top_k, trace, rate=None) -> dict[str, Any]:
        opts = {k: v for k, v in {"adapter": adapter, "mode": mode, "threshold": threshold, "top_k": top_k,
                                  "rate": rate}.items() if v is not None}
        if trace:
            opts["trace"] = True
        return {"steering": opts} if opts else {}

    def chat(self, model: str, messages: list[dict[str, str]], *, adapter: str | None = None, mode: str | None = None,
             threshold: float | None = None, top_k: int | None = None, trace: bool = False, rate: float | None = None,
             **kwargs) -> list[Answer]:
        """One `Answer` per choice (`n` in kwargs). Extra kwargs go to the SDK (max_tokens, seed, ...).
        `rate`: the fire probability of mode random (the random-position control)."""
        extra = {**kwargs.pop("extra_body", {}), **self._steering(adapter, mode, threshold, top_k, trace, rate)}
        r = self.openai.chat.completions.create(model=model, messages=messages, extra_body=extra or None, **kwargs)
        per = (r.usage.completion_tokens // len(r.choices)) if r.usage else 0
        return [Answer(c.message.content or "", c.finish_reason, (gate_report(c) or {}).get("tokens", per),
                       gate_report(c), r) for c in r.choices]

    def complete(self, model: str, prompt: str, *, adapter: str | None = None, mode: str | None = None,
                 threshold: float | None = None, top_k: int | None = None, trace: bool = False,
                 rate: float | None = None, **kwargs) -> list[Answer]:
        """As `chat`, on the completions route with a raw prompt."""
        extra = {**kwargs.pop("extra_body", {}), **self._steering(adapter, mode, threshold, top_k, trace, rate)}
        r = self.openai.completions.create(model=model, prompt=prompt, extra_body=extra or None, **kwargs)
        per = (r.usage.completion_tokens // len(r.choices)) if r.usage else 0
        return [Answer(c.text, c.finish_reason, (gate_report(c) or {}).get("tokens", per), gate_report(c), r)
                for c in r.choices]
