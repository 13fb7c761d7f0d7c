"""Per-row sampling: `logits_to_probs -> sample`, each row with its own parameters and generator.

Contract:
- temperature 0 means argmax (no randomness is drawn); otherwise logits / T, then top-k, top-p
  (nucleus, the smallest prefix of sorted tokens whose mass reaches top_p, always keeping the first),
  min-p (drop tokens whose probability is below min_p times the largest), renormalised.
- Each row samples with its own `torch.Generator`, seeded from `SamplingParams.seed`: a row's tokens
  depend only on its own logits and seed, never on which other rows share the batch.
- Filtering runs only on the rows that ask for it; greedy rows never pay for a sort.

Shapes: logits (B, V) float32; per-row parameters (B,).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["SamplingParams", "logits_to_probs", "make_generator", "sample", "top_logprobs"]


@dataclass
class SamplingParams:
    """How one request samples. Field order and meaning follow the OpenAI API and vLLM."""

    max_tokens: int = field(default=256, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy (argmax)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass in (0, 1]; 1 = off"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens; 0 = off"})
    min_p: float = field(default=0.0, metadata={"help": "drop p < min_p * max p; 0 = off"})
    seed: int | None = field(default=None, metadata={"help": "seed of this row's generator"})
    stop: Sequence[str] = field(default=(), metadata={"help": "stop strings, excluded from the text"})
    stop_token_ids: Sequence[int] = field(default=(), metadata={"help": "token ids that end the request"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep going past EOS"})
    logprobs: int | None = field(default=None, metadata={"help": "None: none; n >= 0: chosen + top n"})
    logprobs_source: str = field(default="steered", metadata={"help": "'steered' or 'base' distribution"})

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be finite and >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be None or >= 0"),
            (self.logprobs_source in ("steered", "base"), "logprobs_source must be 'steered' or 'base'"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded with `seed`, or from fresh OS entropy when seed is None."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def logits_to_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p per row. logits (B, V) -> probs (B, V) float32."""
    dev = logits.device
    temp = torch.tensor([max(p.temperature, 1e-5) for p in params], device=dev)  # (B,)
    logits = logits.float() / temp[:, None]
    if not any(p.filters for p in params):
        return torch.softmax(logits, dim=-1)
    vocab = logits.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=dev)  # (B,)
    top_p = torch.tensor([p.top_p for p in params], device=dev)  # (B,)
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(vocab, device=dev)[None, :]  # (1, V)
    drop = ranks >= top_k[:, None]
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, -math.inf), dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V) mass of better tokens
    drop |= mass_before >= top_p[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=dev)  # (B,)
    drop |= sorted_probs < min_p[:, None] * sorted_probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    filtered = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator],
    argmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row. logits (B, V) float32 -> tokens (B,) int64. `argmax`: logits.argmax(-1) if known."""
    tokens = (logits.argmax(dim=-1) if argmax is None else argmax.clone())  # (B,) greedy rows keep this
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    probs = logits_to_probs(logits[rows], [params[i] for i in rows])  # (R, V)
    for j, i in enumerate(rows):
        tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
    return tokens


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Log-probabilities of the chosen tokens and the n best. (B, V), (B,) -> (B,), (B, n), (B, n)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    best = torch.topk(logp, n, dim=-1) if n > 0 else None
    if best is None:
        empty = logp.new_empty(logp.shape[0], 0)
        return chosen, empty, empty.long()
    return chosen, best.values, best.indices
