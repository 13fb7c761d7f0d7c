"""What goes into the decode engine and what comes out: requests, token events, gate reports.

Contract:
- A `Request` is token ids plus `SamplingParams` (how to sample) and `SteeringParams` (which adapter,
  `mode` off | gated | always, threshold override, candidate top-k override, whether to trace).
- The engine answers with `TokenEvent`s, one per generated token, in order; the last event of a request
  has `finish_reason` set ("stop", "length", "cancelled", or "error" with `error` saying why the engine
  could not run it) and carries its `GateReport`.
- `GateReport.gate_fired` counts the generated tokens at which the adapter was applied: 0 in mode off,
  the tokens whose base entropy exceeded the threshold in mode gated, every token in mode always, and in
  mode random (the paper's random-position control) the tokens a seeded coin with probability `rate`
  picked, whatever their entropy.
  `fire_rate` = gate_fired / tokens. With `trace`, `GateReport.trace` has one `TraceEntry` per token.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass, field

from .gate import MODES
from .sampling import SamplingParams

__all__ = ["Completion", "GateReport", "Request", "SteeringParams", "TokenEvent", "TraceEntry", "random_rate"]


@dataclass
class SteeringParams:
    """Per-request steering. Threshold and top_k default to the adapter's manifest."""

    adapter: str | None = field(default=None, metadata={"help": "registered adapter name"})
    mode: str = field(default="off", metadata={"help": "off | gated | always"})
    threshold: float | None = field(default=None, metadata={"help": "entropy gate in nats (>= 0, inf ok)"})
    top_k: int | None = field(default=None, metadata={"help": "base top-k candidates a correction may move "
                                                       "(0: a teacher's full distribution)"})
    trace: bool = field(default=False, metadata={"help": "return a per-token trace"})
    rate: float | None = field(default=None, metadata={"help": "mode random: fire probability per token "
                                                        "(default: the adapter's measured fire rate)"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"steering mode {self.mode!r} is unknown: use one of {', '.join(MODES)}")
        if self.mode != "off" and not self.adapter:
            raise ValueError(f"steering mode {self.mode!r} needs an adapter: name one, or use mode 'off'")
        t = self.threshold
        if t is not None and (not isinstance(t, (int, float)) or math.isnan(t) or t < 0):
            raise ValueError(f"threshold must be a number >= 0 (nats; inf disables the gate), got {t!r}")
        if self.rate is not None and not (isinstance(self.rate, (int, float)) and 0 <= self.rate <= 1):
            raise ValueError(f"steering rate must be a probability in [0, 1], got {self.rate!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"steering top_k must be an integer >= 1 (0: a teacher's full distribution), "
                             f"got {self.top_k!r}")


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: SteeringParams = field(default_factory=SteeringParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def gate_key(self) -> int:
        """Key of mode random's coin: the sampling seed, so seeded requests fire at the same positions on
        every backend and rerun (unseeded ones: a hash of the request id)."""
        if self.sampling.seed is not None:
            return int(self.sampling.seed)
        digest = hashlib.blake2b(self.request_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


def random_rate(steering: SteeringParams, manifest) -> float:
    """Mode random's fire probability: the request's `rate`, else the adapter's measured fire rate."""
    rate = steering.rate if steering.rate is not None else (manifest.gate.measured_fire_rate if manifest else None)
    if rate is None:
        raise ValueError("mode random needs a fire rate: pass steering.rate (e.g. the gated arm's measured fire "
                         "rate), or use an adapter whose adapter.json records gate.measured_fire_rate")
    return float(rate)


@dataclass
class TraceEntry:
    position: int  # index of the token in the completion
    entropy: float  # base entropy in nats (the adapted model's in `always` mode with a lora adapter)
    fired: bool  # the adapter was applied at this token
    base_token: int  # argmax of the base distribution
    chosen_token: int  # the token generated
    text: str = ""  # the generated token decoded alone (for display: where the gate fired in the text)


@dataclass
class GateReport:
    adapter: str | None
    mode: str
    threshold: float | None
    tokens: int = 0
    gate_fired: int = 0
    trace: list[TraceEntry] | None = None
    rate: float | None = None  # mode random only
    teacher_tokens: int | None = None  # a teacher: the tokens it processed (its prefills at fired positions)

    @property
    def fire_rate(self) -> float:
        return self.gate_fired / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        out = {
            "adapter": self.adapter, "mode": self.mode, "threshold": self.threshold, "tokens": self.tokens,
            "gate_fired": self.gate_fired, "fire_rate": self.fire_rate,
        }
        if self.rate is not None:
            out["rate"] = self.rate
        if self.teacher_tokens is not None:
            out["teacher_tokens"] = self.teacher_tokens
        if self.trace is not None:
            out["trace"] = [vars(t) for t in self.trace]
        return out


@dataclass
class TokenEvent:
    request_id: str
    token_id: int | None  # None only for an event that ends a request without a token (cancel)
    text: str  # text to show now (may be empty while held back)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    report: GateReport | None = None
    error: str | None = None  # with finish_reason "error": why the engine could not run this request
    fired: bool | None = None  # the adapter was applied at this token (None where the backend cannot tell yet)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Completion:
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    report: GateReport
    logprobs: list[float] = field(default_factory=list)
