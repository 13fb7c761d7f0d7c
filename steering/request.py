"""What goes into the decode engine and what comes out: requests, the steering value, token events, gate reports.

Contract:
- A `Request` is token ids plus `SamplingParams` (how to sample) and `SteeringParams` (how to steer).
- `SteeringParams` is the one steering value: frozen, validated once where it is built (`__post_init__`: HTTP,
  CLI, Python API and vLLM's `extra_args` all build it, so each refuses a bad field with the same message), and
  carried unchanged to the gate. `resolved(manifest)` fills what the request left to its adapter (threshold,
  top-k, mode random's rate) once, where the engine takes the request; `to_json` / `from_json` are its wire form
  (the HTTP `steering` object's field names; an infinite threshold as "inf"), which vLLM's `extra_args` carry.
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

import contextlib
import dataclasses
import hashlib
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from .modes import DEFAULT_TOP_K, LogprobsSource, Mode, check_steering
from .sampling import SamplingParams

__all__ = ["Completion", "GateReport", "Request", "SteeringParams", "TokenEvent", "TraceEntry", "UnknownAdapter"]

class UnknownAdapter(ValueError):
    """A request names an adapter that is not loaded: the one message every backend and the server give."""

    def __init__(self, name: str | None, loaded):
        super().__init__(f"unknown adapter {name!r}; loaded adapters: {', '.join(sorted(loaded)) or 'none'}")


@dataclass(frozen=True)
class SteeringParams:
    """Per-request steering. Threshold, top_k and mode random's rate default to the adapter's manifest
    (`resolved`). ValueError at construction if a field is invalid (`check_steering`) or mode needs an adapter."""

    adapter: str | None = field(default=None, metadata={"help": "registered adapter name"})
    mode: Mode = field(default="off", metadata={"help": "off | gated | always | random (modes.MODES)"})
    threshold: float | None = field(default=None, metadata={"help": "entropy gate in nats (>= 0, inf ok)"})
    top_k: int | None = field(default=None, metadata={"help": "base top-k candidates a correction may move "
                                                       "(0: a teacher's full distribution)"})
    trace: bool = field(default=False, metadata={"help": "return a per-token trace"})
    rate: float | None = field(default=None, metadata={"help": "mode random: fire probability per token "
                                                        "(default: the adapter's measured fire rate)"})
    logprobs: LogprobsSource = field(default="steered", metadata={"help": "the distribution logprobs report"})

    def __post_init__(self) -> None:
        check_steering(self.mode, self.threshold, self.top_k, self.rate, self.logprobs, self.trace)
        if self.mode != "off" and not self.adapter:
            raise ValueError(f"steering mode {self.mode!r} needs an adapter: name one, or use mode 'off'")
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))

    def resolved(self, manifest: Any | None) -> SteeringParams:
        """This steering with what it left to its adapter filled in from the adapter's `manifest` (None: no
        adapter): the threshold (else +inf), top_k (else DEFAULT_TOP_K), and in mode random the rate (else the
        adapter's measured fire rate). ValueError where it cannot run: random without a rate; top_k 0 (the full
        distribution) without a teacher."""
        gate = manifest.gate if manifest is not None else None
        threshold = self.threshold if self.threshold is not None else (gate.tau if gate else math.inf)
        top_k = self.top_k if self.top_k is not None else (manifest.top_k if manifest is not None else DEFAULT_TOP_K)
        rate = self.rate
        if self.mode == "random" and rate is None:
            rate = gate.measured_fire_rate if gate else None
            if rate is None:
                raise ValueError("mode random needs a fire rate: pass steering.rate (e.g. the gated arm's measured "
                                 "fire rate), or use an adapter whose adapter.json records gate.measured_fire_rate")
        if top_k == 0 and (manifest is None or manifest.kind != "teacher"):
            raise ValueError("steering top_k 0 (the full distribution) is for teachers only: an adapter corrects "
                             "the base top-k candidates, so give top_k >= 1")
        return dataclasses.replace(self, threshold=threshold, top_k=top_k, rate=rate)

    @property
    def gate_tau(self) -> float:
        """The mode folded into one threshold (of a resolved value): +inf off and random (never by entropy), the
        threshold gated, -inf always (fires at every token)."""
        return {"off": math.inf, "gated": self.threshold, "always": -math.inf, "random": math.inf}[self.mode]

    @property
    def random_rate(self) -> float | None:
        """Mode random's coin probability (of a resolved value); None in every other mode."""
        return self.rate if self.mode == "random" else None

    def report(self) -> GateReport:
        """An empty gate report for this (resolved) steering: no tokens yet, a trace list if asked (a teacher's
        correction starts its token count: corrections.py)."""
        return GateReport(adapter=self.adapter, mode=self.mode,
                          threshold=self.threshold if self.mode in ("gated", "always") else None,
                          trace=[] if self.trace else None, rate=self.random_rate)

    def to_json(self) -> dict[str, Any]:
        """The wire form: the HTTP `steering` object's fields, an infinite threshold as "inf"."""
        out = dataclasses.asdict(self)
        if out["threshold"] is not None and math.isinf(out["threshold"]):
            out["threshold"] = "inf"
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "steering") -> SteeringParams:
        """The value `to_json` wrote (or a client sent); ValueError naming the field to fix."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object with the fields {', '.join(_FIELDS)}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {', '.join(unknown)}: the fields are {', '.join(_FIELDS)}")
        values = dict(data)
        if isinstance(values.get("threshold"), str):  # JSON has no infinity: "inf" travels as a string
            with contextlib.suppress(ValueError):  # else check_steering names it
                values["threshold"] = float(values["threshold"])
        return cls(**values)


_FIELDS = tuple(f.name for f in dataclasses.fields(SteeringParams))


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
