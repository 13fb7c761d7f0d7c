"""One request's state inside the engine: its gate settings, sampling seed, text stream and report.

Contract: a `Row` is created at submit time from a validated request and its resolved adapter; it
turns the engine's per-token outcome (token, entropy, fired, base argmax) into a `TokenEvent`, decides
when the request finishes ("stop" on EOS, a stop token id or a stop string; "length" at max_tokens or
the model's context), and keeps the `GateReport`. `gate_tau` folds the mode into one threshold:
+inf for off (never fires), the threshold for gated, -inf for always (fires at every token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import HeadAdapter, LoraAdapter
from .detok import TextStream
from .request import GateReport, Request, TokenEvent, TraceEntry, random_rate
from .sampling import row_seed, top_logprobs, uniform
from .teacher import Teacher, TeacherCursor, next_logits

__all__ = ["GateSettings", "Row", "teacher_logits"]

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class GateSettings:
    """A request's gate resolved against its adapter: `tau` (the request's threshold, else the adapter's),
    `gate_tau` (the mode folded in: +inf off/random, tau gated, -inf always), `random_rate` (mode random's
    coin, else None), `cand_k` (head candidates) and whether a LoRA runs in every forward. Every backend
    resolves a request's gate here, and starts its `GateReport` with `report`."""

    mode: str
    adapter: str | None
    tau: float
    gate_tau: float
    random_rate: float | None
    cand_k: int
    lora_always: bool

    @classmethod
    def of(cls, steering, adapter: HeadAdapter | LoraAdapter | Teacher | None) -> GateSettings:
        manifest = adapter.manifest if adapter is not None else None
        tau = steering.threshold if steering.threshold is not None else (manifest.gate.tau if manifest else math.inf)
        gate_tau = {"off": math.inf, "gated": float(tau), "always": -math.inf, "random": math.inf}[steering.mode]
        rate = random_rate(steering, manifest) if steering.mode == "random" else None  # a coin, not H
        k = steering.top_k if steering.top_k is not None else (manifest.top_k if manifest else DEFAULT_TOP_K)
        if k == 0 and not isinstance(adapter, Teacher):
            raise ValueError("steering top_k 0 (the full distribution) is for teachers only: an adapter corrects "
                             "the base top-k candidates, so give top_k >= 1")
        return cls(steering.mode, adapter.name if adapter is not None else None, float(tau), gate_tau, rate, k,
                   isinstance(adapter, LoraAdapter) and steering.mode == "always")

    def report(self, trace: bool = False, teacher: bool = False) -> GateReport:
        """An empty gate report for this gate (no tokens yet; a trace list if asked; a teacher's token count)."""
        return GateReport(adapter=self.adapter, mode=self.mode,
                          threshold=self.tau if self.mode in ("gated", "always") else None,
                          trace=[] if trace else None, rate=self.random_rate, teacher_tokens=0 if teacher else None)


class Row:
    def __init__(self, request: Request, adapter: HeadAdapter | LoraAdapter | Teacher | None, tokenizer: Any):
        steering, self.request, self.adapter = request.steering, request, adapter
        gate = GateSettings.of(steering, adapter)
        self.gate_tau, self.random_rate, self.cand_k, self.lora_always = (gate.gate_tau, gate.random_rate,
                                                                          gate.cand_k, gate.lora_always)
        self.seed = row_seed(request.sampling.seed)  # the key of this row's counter-based draws
        self.stream = TextStream(tokenizer, request.sampling.stop)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        is_teacher = isinstance(adapter, Teacher) and steering.mode != "off"
        self.report = gate.report(steering.trace, teacher=is_teacher)
        self.cursor = TeacherCursor(adapter) if is_teacher else None  # the teacher's lazy KV cache

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self):
        return self.request.sampling

    @property
    def draw(self) -> float:
        """This row's uniform draw for its next token (sampling.uniform; 0 for greedy rows, which use none)."""
        return 0.0 if self.params.greedy else uniform(self.seed, len(self.token_ids))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def record(
        self, token: int, ent: float, fired: bool, base_token: int,
        base_logits: torch.Tensor, steered_logits: torch.Tensor, eos_ids: frozenset[int], max_len: int,
    ) -> TokenEvent:
        """Account for one generated token and return its event (the last one carries the report)."""
        sp = self.params
        if self.report.trace is not None:
            piece = self.stream.tokenizer.decode([token])
            self.report.trace.append(TraceEntry(len(self.token_ids), ent, fired, base_token, token, piece))
        self.token_ids.append(token)
        self.report.tokens += 1
        self.report.gate_fired += int(fired)
        logprob, top = self._logprobs(token, base_logits, steered_logits)
        stop_token = (token in eos_ids and not sp.ignore_eos) or token in sp.stop_token_ids
        text = "" if stop_token else self.stream.push(token)
        if stop_token or self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= sp.max_tokens or len(self.request.prompt_ids) + len(self.token_ids) >= max_len:
            self.finish_reason = "length"
        if self.finish_reason:
            text += self.stream.finish()
        return TokenEvent(
            self.request_id, token, text, logprob, top, self.finish_reason,
            self.report if self.finish_reason else None, fired=fired,
        )

    def cancel(self) -> TokenEvent:
        self.finish_reason = "cancelled"
        return TokenEvent(self.request_id, None, self.stream.finish(), finish_reason="cancelled", report=self.report)

    def fail(self, message: str) -> TokenEvent:
        """End this request because the engine could not run it (the others go on)."""
        self.finish_reason = "error"
        return TokenEvent(self.request_id, None, "", finish_reason="error", report=self.report, error=message)

    def _logprobs(self, token: int, base: torch.Tensor, steered: torch.Tensor):
        n = self.params.logprobs
        if n is None:
            return None, None
        logits = base if self.params.logprobs_source == "base" else steered
        chosen, values, indices = top_logprobs(logits[None], torch.tensor([token], device=logits.device), n)
        return float(chosen[0]), list(zip(indices[0].tolist(), values[0].tolist(), strict=True))


def teacher_logits(rows: list[Row]) -> list[torch.Tensor]:
    """Each teacher row's next-token logits after its text so far: the rows of one teacher in batched forwards
    (`teacher.next_logits`); each row's report counts the tokens its teacher processed."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    by_teacher: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_teacher.setdefault(id(row.cursor.teacher), []).append(i)
    for idx in by_teacher.values():
        before = [rows[i].cursor.tokens for i in idx]
        logits = next_logits([rows[i].cursor for i in idx], [rows[i].request.prompt_ids + rows[i].token_ids
                                                             for i in idx])
        for i, was, lg in zip(idx, before, logits, strict=True):
            rows[i].report.teacher_tokens += rows[i].cursor.tokens - was
            out[i] = lg
    return out
