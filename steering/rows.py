"""One request's state inside the engine: its resolved steering, sampling seed, text stream and report.

Contract: a `Row` is created at submit time from a validated request and its adapter; it holds the request's
steering resolved against that adapter once (`SteeringParams.resolved`: `gate_tau` folds the mode into one
threshold, +inf for off and random, the threshold for gated, -inf for always), turns the engine's per-token
outcome (token, entropy, fired, base argmax) into a `TokenEvent`, decides when the request finishes ("stop" on
EOS, a stop token id or a stop string; "length" at max_tokens or the model's context), and keeps the `GateReport`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .adapters import HeadAdapter, LoraAdapter
from .corrections import correction_of
from .detok import TextStream
from .request import Request, TokenEvent, TraceEntry
from .sampling import row_seed, top_logprobs, uniform
from .teacher import Teacher, TeacherCursor

__all__ = ["Row"]


class Row:
    def __init__(self, request: Request, adapter: HeadAdapter | LoraAdapter | Teacher | None, tokenizer: Any):
        self.request, self.adapter = request, adapter
        self.steering = request.steering.resolved(adapter.manifest if adapter is not None else None)
        self.correction = correction_of(adapter) if adapter is not None else None  # corrections.py
        self.every_forward = self.correction is not None and self.correction.every_forward(self.steering)
        self.seed = row_seed(request.sampling.seed)  # the key of this row's counter-based draws
        self.stream = TextStream(tokenizer, request.sampling.stop)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.report = self.steering.report()
        # whether this row reads its base entropy: a finite gate (off, random, always and a +inf threshold
        # never compare it) or a trace, which reports it
        self.reads_entropy = math.isfinite(self.steering.gate_tau) or self.report.trace is not None
        self.cursor: TeacherCursor | None = None  # a teacher's lazy KV cache (its Correction's `start`)
        if self.correction is not None:
            self.correction.start(self)

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
        logits = base if self.steering.logprobs == "base" else steered
        chosen, values, indices = top_logprobs(logits[None], torch.tensor([token], device=logits.device), n)
        return float(chosen[0]), list(zip(indices[0].tolist(), values[0].tolist(), strict=True))

