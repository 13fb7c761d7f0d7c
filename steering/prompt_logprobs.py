"""Prompt logprobs (`echo` with `logprobs`): the log-probability of every prompt token under the model a
request is served as, from one prefill. This is what a loglikelihood task (lm-eval's multiple choice)
measures, so for a steered model it must be the steered model's, by the same gate as generation.

Contract: `score_prompts(engine, prompts, adapter, steering, top_n, key)` returns one `PromptLogprobs`
per prompt; `score_pieces(...)` is the same work as a generator that yields after every CHUNK positions
(their prefill over the cache of the positions before, and their scores) and returns that list (a server runs
it a piece at a time between decode steps). Token 0 has no logprob (None: nothing predicts it). Token j >= 1
is scored by the distribution computed from the hidden state at token j - 1, exactly as a generated token is
scored from the position before it:
- mode `off`: the base distribution.
- `head` adapter: where the gate fires on the base entropy at j - 1 (`gated`: H > tau; `always`: every
  position; `random`: the coin `random_fire(key, -j, rate)`, prompt tokens keyed by negative positions so
  they never share a coin with a completion token), logits[c] += scale * W_U[c] (B A h) on the base
  top-k candidates c, as in decoding.
- `lora` adapter, `always`: the adapted model over the whole prompt (PEFT's model with the adapter on).
- `lora` adapter, `gated` / `random`: the base prefill; at a fired position the hidden state of token
  j - 1 is recomputed with the LoRA on over the base cache of tokens < j - 1, as gated decoding does.
- a `Teacher`: at a fired position, the teacher's logits restricted to the base top-k candidates (k = 0:
  all), from one teacher forward over the prompt (run only if some position fires).
`steering.logprobs` "base" reports the base distribution whatever the steering.
`fired` counts the scored positions where the correction applied. A prompt is prefilled and scored in chunks
of CHUNK positions (over the cache of the positions before), so a long prompt never holds (n, V) float32
logits at once, and a server can run other work between two chunks.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import torch

from .adapters import HeadAdapter, LoraAdapter
from .batch import cache_kwarg, new_cache
from .corrections import PromptChunk, correction_of
from .gate import entropy, gate_mask, random_fire
from .request import SteeringParams
from .sampling import top_logprobs

__all__ = ["CHUNK", "PromptLogprobs", "score_pieces", "score_prompts"]

CHUNK = 256


@dataclass
class PromptLogprobs:
    token_ids: list[int]
    logprobs: list[float | None]  # one per token; None for token 0
    top: list[list[tuple[int, float]] | None]  # the top_n (token id, logprob) per token; None for token 0
    fired: int = 0  # scored positions where the correction applied

    @property
    def scored(self) -> int:
        return max(0, len(self.token_ids) - 1)


def score_prompts(engine, prompts: list[list[int]], adapter: HeadAdapter | LoraAdapter | None,
                  steering: SteeringParams, top_n: int, key: int = 0) -> list[PromptLogprobs]:
    """Prompt logprobs of each prompt under `steering` with its resolved `adapter` (see the module docstring).
    Runs on the engine's thread (the LoRA router is shared state); `engine` is an `Engine`."""
    pieces = score_pieces(engine, prompts, adapter, steering, top_n, key)
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value


def score_pieces(engine, prompts: list[list[int]], adapter: HeadAdapter | LoraAdapter | None,
                 steering: SteeringParams, top_n: int, key: int = 0) -> Generator[None, None, list[PromptLogprobs]]:
    """`score_prompts` a piece at a time: yields after every CHUNK positions of a prompt; returns the list."""
    gate = steering.resolved(adapter.manifest if adapter is not None else None)
    out = []
    for ids in prompts:
        out.append((yield from _score_one(engine, ids, adapter, gate, top_n, key)))
    return out


def _score_one(engine, ids: list[int], adapter, gate: SteeringParams, top_n: int,
               key: int) -> Generator[None, None, PromptLogprobs]:
    """One prompt, CHUNK positions per piece: their prefill (over the cache of the positions before) and their
    scores. A prompt of one chunk is prefilled whole (the fused prefill where it applies)."""
    n, device = len(ids), engine.model.device
    with torch.inference_mode():
        x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, n)
    result = PromptLogprobs(list(ids), [None], [None])
    correction = correction_of(adapter) if adapter is not None else None
    every = correction is not None and correction.every_forward(gate)  # the adapted model over the whole prompt
    prompt = PromptChunk(x, None, 0)
    for start in range(0, n, CHUNK):
        end = min(start + CHUNK, n)
        with torch.inference_mode():  # not across a yield: the caller's code between pieces is its own
            prompt.cache, hidden = _prefill(engine, x, start, end, prompt.cache, adapter if every else None)
            prompt.start = start
            rows = min(end, n - 1) - start  # hidden row j predicts token j + 1; the last token predicts nothing
            if rows > 0:
                lp, top, fired = _score_chunk(engine, prompt, hidden[:rows], x[0, start + 1:start + 1 + rows],
                                              adapter, correction if not every else None, gate, top_n, key)
                result.logprobs += lp
                result.top += top
                result.fired += fired
        if end < n:
            yield
    return result


def _prefill(engine, x: torch.Tensor, start: int, end: int, cache, every_forward):
    """Prefill prompt columns start..end-1 of x (1, n) over `cache` (the columns before; None at 0), with the
    LoRA `every_forward` on where given. Returns the cache and their hidden states (end - start, d)."""
    device = x.device
    routes = {every_forward.name: torch.zeros(1, dtype=torch.long, device=device)} if every_forward else {}
    if engine.fused is not None and not routes and start == 0 and end == x.shape[1]:  # the fused prefill (fused.py)
        return engine.fused.prefill([x[0].tolist()], every=True)  # every position's hidden state (n, d)
    decoder = engine.model.get_decoder()
    cache = new_cache() if cache is None else cache
    with engine.lora.route(routes):
        positions = torch.arange(start, end, device=device)[None]  # (1, c)
        out = decoder(input_ids=x[:, start:end], attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                      position_ids=positions, use_cache=True, **{cache_kwarg(decoder): cache})
    return cache, out.last_hidden_state[0]


def _score_chunk(engine, prompt: PromptChunk, hidden, targets, adapter, correction, gate: SteeringParams,
                 top_n: int, key: int):
    """Positions start .. start + len(hidden) - 1 (as hidden rows); they predict tokens start + 1 ...
    `correction` None: nothing applies on top (mode off, or a source already in every forward)."""
    logits = engine.lm_head(hidden).float()  # (c, V) base (adapted for every-forward sources)
    fired = _fired(entropy(logits), gate, prompt.start, key)  # (c,) bool
    steered = logits
    if fired.any() and correction is not None:
        sel = fired.nonzero()[:, 0]  # (f,)
        steered = logits.clone()
        steered[sel] = correction.score(engine, adapter, prompt, sel, hidden, logits, gate)
    n_fired = int(fired.sum())  # every-forward: every position (h > -inf)
    use = logits if gate.logprobs == "base" else steered
    chosen, values, indices = top_logprobs(use, targets, top_n)
    top = [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]
    return chosen.tolist(), top, n_fired


def _fired(h: torch.Tensor, gate: SteeringParams, start: int, key: int) -> torch.Tensor:
    """Where the correction applies at hidden rows start.. (predicting tokens start+1..). (c,) -> bool (c,)"""
    if gate.random_rate is not None:
        coins = [random_fire(key, -(start + i + 1), gate.random_rate) for i in range(h.shape[0])]
        return torch.tensor(coins, dtype=torch.bool, device=h.device)
    return gate_mask(h, gate.gate_tau)
