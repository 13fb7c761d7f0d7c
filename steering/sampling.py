"""Batched sampling: `logits_to_probs -> sample`, each row with its own parameters and its own draws.

Contract:
- temperature 0 means argmax (no randomness is used); otherwise logits / T, then top-k, top-p
  (nucleus, the smallest prefix of sorted tokens whose mass reaches top_p, always keeping the first),
  min-p (drop tokens whose probability is below min_p times the largest), renormalised: one chain of
  batched kernels for all rows (a row's own parameters as (B,) tensors).
- Randomness is counter-based: row i's draw at token position t is `uniform(seed_i, t)`, a hash of the
  row's seed and the position (no generator state), and the token is the inverse CDF of the row's
  filtered distribution at that draw (one batched cumsum and searchsorted; `sample` gives the order).
  So a row's tokens depend only on its own logits, seed and position: never on which rows share the
  batch, how the batch was formed, or what ran before; the same seed gives the same text. (This replaced
  one torch.Generator and torch.multinomial per row: a seed now draws other tokens than it did before.)
  An unseeded request gets a random 63-bit seed at submission.
- Filtering runs only on the rows that ask for it; greedy rows never pay for it, and a filtered row
  looks for its kept set among its top NUCLEUS_K tokens (a partial selection) before any full sort.

Shapes: logits (B, V) float32; per-row parameters and draws (B,).
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["SamplingParams", "logits_to_probs", "row_seed", "sample", "top_logprobs", "uniform"]


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

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be finite and >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs must be None or >= 0"),
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


def row_seed(seed: int | None) -> int:
    """The seed of a row's draws: the request's (reduced to 64 bits), or a fresh random one when None."""
    return secrets.randbits(63) if seed is None else int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def uniform(seed: int, position: int) -> float:
    """The draw of the row seeded `seed` at token `position`: a float in [0, 1) from blake2b of both
    (53 bits, as a double holds)."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8, person=b"rm-sample").digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


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


NUCLEUS_K = 1024  # a filtered row's kept set is looked for among its top 1,024 tokens first (no full sort)


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], draws: Sequence[float] | torch.Tensor,
    argmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row. logits (B, V) float32, draws (B,) in [0, 1) (see `uniform`; greedy rows' are
    ignored) -> tokens (B,) int64. `argmax`: logits.argmax(-1) if known.

    A filtered row's token is the inverse CDF at its draw over its kept tokens in decreasing probability
    (ties in topk's order); an unfiltered row's, over the whole vocabulary in id order. The kept set and
    its probabilities are `logits_to_probs`'s, found among the row's top NUCLEUS_K tokens when it fits
    there (one partial selection instead of a sort of the vocabulary), else by a full sort."""
    tokens = (logits.argmax(dim=-1) if argmax is None else argmax.clone())  # (B,) greedy rows keep this
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    u = torch.as_tensor(draws, dtype=torch.float64).to(logits.device)  # (B,) one small host->device copy
    vocab = logits.shape[-1]
    filtered = [i for i in rows if _filters(params[i], vocab)]
    plain = [i for i in rows if not _filters(params[i], vocab)]
    if plain:
        z = _tempered(logits[plain], [params[i] for i in plain])
        ids = torch.arange(z.shape[-1], device=z.device).expand_as(z)
        tokens[plain] = _inverse_cdf(torch.softmax(z, dim=-1), ids, u[plain])
    if filtered:
        z = _tempered(logits[filtered], [params[i] for i in filtered])
        sub = [params[i] for i in filtered]
        kept, order, fits = _nucleus(z, sub, min(NUCLEUS_K, z.shape[-1]))  # (F, K), (F, K), (F,)
        picked = _inverse_cdf(kept, order, u[filtered])
        if not bool(fits.all()):  # rows whose kept set reaches past their top K: the full sort
            wide = (~fits).nonzero()[:, 0]
            kept, order, _ = _nucleus(z[wide], [sub[j] for j in wide.tolist()], z.shape[-1])
            picked[wide] = _inverse_cdf(kept, order, u[filtered][wide])
        tokens[filtered] = picked
    return tokens


def _filters(p: SamplingParams, vocab: int) -> bool:
    """Whether a row's filters can drop a token: a top_k of the vocabulary or more keeps every one (as vLLM
    clamps it), so it samples exactly as top_k 0 does."""
    return 0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0.0


def _tempered(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    temp = torch.tensor([max(p.temperature, 1e-5) for p in params], device=logits.device)  # (R,)
    return logits.float() / temp[:, None]


def _nucleus(z: torch.Tensor, params: Sequence[SamplingParams], k: int):
    """Top-k, top-p and min-p of tempered logits z (R, V) among each row's k best tokens. Returns the kept
    probabilities in decreasing order (R, k) (0 where dropped, unnormalised), their token ids (R, k), and
    whether each row's kept set is exact, i.e. fits in its top k. (k = V: always exact.)"""
    dev, vocab = z.device, z.shape[-1]
    vals, order = z.topk(k, dim=-1)  # (R, k) sorted, decreasing
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=dev)  # (R,)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    drop = torch.arange(k, device=dev)[None, :] >= top_k[:, None]  # (R, k)
    within = top_k <= k  # the top-k cut lies inside: renormalise over it, else over the whole vocabulary
    norm = torch.where(within, torch.logsumexp(vals.masked_fill(drop, -math.inf), -1), torch.logsumexp(z, -1))
    probs = torch.exp(vals - norm[:, None]).masked_fill(drop, 0.0)  # (R, k) as logits_to_probs' sorted_probs
    mass_before = probs.cumsum(dim=-1) - probs
    fits = within | (probs.sum(-1) >= top_p) | (probs[:, -1] < min_p * probs[:, 0])
    drop |= mass_before >= top_p[:, None]
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    return probs.masked_fill(drop, 0.0), order, fits


def _inverse_cdf(probs: torch.Tensor, ids: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token at draw u of each row's (unnormalised) probabilities over `ids`. (R, n), (R, n), (R,) -> (R,)."""
    cdf = probs.double().cumsum(dim=-1)  # (R, n)
    total = cdf[:, -1]  # (R,)
    if not bool((torch.isfinite(total) & (total > 0)).all()):  # NaN / inf logits: no distribution to draw from
        raise ValueError("a row's sampling distribution is not finite (NaN or infinite logits or temperature)")
    target = (u * total)[:, None]  # (R, 1) in [0, total)
    picked = torch.searchsorted(cdf, target, right=True)  # (R, 1) first entry whose cdf exceeds the draw
    # Past the last positive entry only by rounding: take that entry instead.
    last = (probs > 0).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # (R, 1)
    return ids.gather(1, torch.minimum(picked, last))[:, 0]


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """Log-probabilities of the chosen tokens and the n best. (B, V), (B,) -> (B,), (B, n), (B, n)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    best = torch.topk(logp, n, dim=-1) if n > 0 else None
    if best is None:
        empty = logp.new_empty(logp.shape[0], 0)
        return chosen, empty, empty.long()
    return chosen, best.values, best.indices
