"""Gate math: pure functions of the base model's logits at one position.

Contract (DESIGN.md, "Words"):
- `entropy(logits)` is the Shannon entropy in nats of softmax(logits) over the full vocabulary, per row,
  computed in float32 whatever the input dtype. Masked logits (-inf) contribute exactly 0.
- `gate_mask(h, tau)` is `h > tau`, elementwise. tau = +inf never fires; the comparison is strict, so a
  row whose entropy equals tau does not fire.
- `random_fire(key, position, rate)` is the random-position control's gate (mode `random`): it fires at
  a (key, position) with probability `rate`, decided by a hash, so every backend and every rerun fires
  at the same positions for the same key (the request's seed).
- `topk_candidates(logits, k)` are the indices of the k largest base logits per row (the candidate set c
  on which a `head` adapter may move logits), ordered by decreasing logit.

Shapes: logits (B, V); entropies and thresholds (B,); candidates (B, k).
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["entropy", "gate_mask", "random_fire", "topk_candidates"]

def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy H(softmax(logits)) in nats, float32. (B, V) -> (B,).

    H = log S - sum(e * z) / S with z = logits - max, e = exp(z), S = sum(e): four passes over the
    logits (a tenth of the cost of log_softmax * softmax on CPU). Terms with z = -inf are 0 * -inf = nan
    and are exactly the zero-probability tokens, so `nansum` drops them.
    """
    z = logits.float()
    z = z - z.amax(dim=-1, keepdim=True)  # (B, V)
    e = z.exp()
    s = e.sum(dim=-1)  # (B,)
    return s.log() - torch.nansum(e * z, dim=-1) / s


def gate_mask(h: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Where the gate fires: `h > tau` (strict). h (B,), tau scalar or (B,) -> bool (B,)."""
    if not torch.is_tensor(tau):
        tau = torch.tensor(float(tau), dtype=torch.float32, device=h.device)
    return h > tau.to(dtype=torch.float32, device=h.device)


def random_fire(key: int, position: int, rate: float) -> bool:
    """Fire at token `position` of the request keyed `key` with probability `rate` (blake2b of both)."""
    digest = hashlib.blake2b(f"{key}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < rate * 2**64


def topk_candidates(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest logits per row, by decreasing logit. (B, V) -> (B, k) int64."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    k = min(k, logits.shape[-1])
    return torch.topk(logits.float(), k, dim=-1, sorted=True).indices
