"""Prometheus metrics on an explicit registry (never the global one), one instance per app.

Contract: `Metrics.observe_choice` counts generated and gate-fired tokens by model, adapter and mode and
records the choice's fire rate; `observe_cancelled` counts choices that ended unfinished and the tokens
they had generated; rejections (queue full, shutting down) are counted apart from cancellations;
`observe_echo` counts prompt tokens scored for echo logprobs and where the gate fired among them; request
latency and time to first token are histograms; running and waiting requests are gauges read from the
engine at scrape time; every response is counted by status code, 500s included.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        self.registry = CollectorRegistry()
        labels = ("model", "adapter", "mode")
        r = self.registry
        self.generated = Counter("reasonmaxxer_generated_tokens", "Tokens generated", labels, registry=r)
        self.gate_fired = Counter("reasonmaxxer_gate_fired_tokens", "Tokens where the adapter was applied",
                                  labels, registry=r)
        self.teacher_tokens = Counter("reasonmaxxer_teacher_tokens", "Tokens a teacher processed (its prefills at "
                                      "fired positions)", labels, registry=r)
        self.prompt_scored = Counter("reasonmaxxer_prompt_scored_tokens", "Prompt tokens scored for echo logprobs",
                                     labels, registry=r)
        self.prompt_fired = Counter("reasonmaxxer_prompt_gate_fired_tokens",
                                    "Prompt tokens scored (echo) where the adapter was applied", labels, registry=r)
        self.fire_rate = Histogram("reasonmaxxer_request_fire_rate", "Per-choice gate fire rate", ("model", "mode"),
                                   buckets=(0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0), registry=r)
        self.latency = Histogram("reasonmaxxer_request_latency_seconds", "Request latency", ("endpoint",),
                                 buckets=_LATENCY, registry=r)
        self.ttft = Histogram("reasonmaxxer_time_to_first_token_seconds", "Time to first token", ("endpoint",),
                              buckets=_LATENCY, registry=r)
        self.cancelled = Counter("reasonmaxxer_cancelled_requests", "Choices cancelled before finishing (client left)",
                                 registry=r)
        self.rejected = Counter("reasonmaxxer_rejected_requests", "Requests refused before they ran (queue full, "
                                "shutting down)", ("reason",), registry=r)
        self.responses = Counter("reasonmaxxer_responses", "Responses by status code", ("status",), registry=r)
        Gauge("reasonmaxxer_requests_running", "Requests in the running batch", registry=r).set_function(running)
        Gauge("reasonmaxxer_requests_waiting", "Requests waiting to join the batch", registry=r).set_function(waiting)

    def observe_choice(self, model: str, report) -> None:
        adapter, mode = report.adapter or "", report.mode
        self.generated.labels(model, adapter, mode).inc(report.tokens)
        self.gate_fired.labels(model, adapter, mode).inc(report.gate_fired)
        if report.teacher_tokens:
            self.teacher_tokens.labels(model, adapter, mode).inc(report.teacher_tokens)
        self.fire_rate.labels(model, mode).observe(report.fire_rate)

    def observe_cancelled(self, model: str, choices) -> None:
        """Choices that ended before finishing (client left, drain ended): counted, and their tokens too."""
        self.cancelled.inc(len(choices))
        for c in choices:
            labels = (model, c.request.steering.adapter or "", c.request.steering.mode)
            tokens, fired = c.delivered
            self.generated.labels(*labels).inc(tokens)
            self.gate_fired.labels(*labels).inc(fired)

    def observe_echo(self, model: str, steering, scores) -> None:
        """Count one prompt scored for echo logprobs (once per prompt, not per choice)."""
        labels = (model, steering.adapter or "", steering.mode)
        self.prompt_scored.labels(*labels).inc(scores.scored)
        self.prompt_fired.labels(*labels).inc(scores.fired)

    def render(self) -> bytes:
        return generate_latest(self.registry)
