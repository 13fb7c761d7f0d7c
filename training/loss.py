"""The ReasonMaxxer loss (DESIGN.md, method step 4-5), as pure functions on tensors.

Contract, for one sequence with completion tokens x_t, base entropies H_t and advantage A:
- `group_advantages(rewards)`: A_i = (r_i - mean r) / (std r + 1e-8) within a problem's group
  (population std), clipped to [-clip, clip]. A group whose rewards are all equal gets A = 0.
- decision term: mean over t in D = {t : H_t > tau} of -A * log p_theta(x_t | x_<t); 0 when D is empty.
  Minimising it raises the probability of a positive-advantage rollout's tokens at decision points and
  lowers a negative one's.
- anchor term: mean over the positions not in D (prompt positions included where given) of
  KL(p_base || p_theta) over the full vocabulary; 0 when the adapted model equals the base.
- `sequence_loss = decision + kl_weight * anchor`; with A = 0 only the anchor remains.
`head_log_probs` and `head_kl` give the same quantities for a `head` adapter from cached candidate
statistics (base logits on the top-k candidates, the base log-sum-exp), without a full-vocabulary pass:
the head adapter changes only the candidates' logits, so with delta on c,
    LSE' = log(exp(LSE) - sum_c exp(l_c) + sum_c exp(l_c + delta_c))
    KL(p_base || p_theta) = (LSE' - LSE) - sum_c p_base(c) delta_c.
Shapes: T positions, V vocabulary, k candidates, N rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "decision_loss",
    "group_advantages",
    "head_kl",
    "head_log_probs",
    "kl_anchor",
    "sequence_loss",
]


def group_advantages(rewards: Sequence[float], clip: float = 2.5) -> list[float]:
    """Standardised rewards within one problem's group, clipped to [-clip, clip]."""
    r = torch.tensor(rewards, dtype=torch.float64)
    if r.numel() == 0:
        return []
    a = (r - r.mean()) / (r.std(unbiased=False) + 1e-8)
    return a.clamp(-clip, clip).tolist()


def decision_loss(token_logp: torch.Tensor, decision: torch.Tensor, advantage: float) -> torch.Tensor:
    """mean_{t in D} -A log p(x_t). token_logp (T,), decision (T,) bool -> scalar."""
    n = decision.sum()
    if advantage == 0.0 or n == 0:
        return token_logp.new_zeros(())
    return -(advantage * token_logp[decision]).sum() / n


def kl_anchor(base_logits: torch.Tensor, adapted_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over `mask` positions of KL(p_base || p_adapted). (T, V), (T, V), (T,) bool -> scalar."""
    n = mask.sum()
    if n == 0:
        return adapted_logits.new_zeros(())
    base_logp = torch.log_softmax(base_logits[mask].float(), dim=-1)  # (M, V)
    adapted_logp = torch.log_softmax(adapted_logits[mask].float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - adapted_logp)).sum(-1)  # (M,)
    return kl.sum() / n


def sequence_loss(
    token_logp: torch.Tensor, decision: torch.Tensor, advantage: float, anchor: torch.Tensor, kl_weight: float = 0.2
) -> torch.Tensor:
    """The per-sequence loss: decision term + kl_weight * anchor (the anchor already averaged)."""
    return decision_loss(token_logp, decision, advantage) + kl_weight * anchor


def _adapted_lse(cand_logits: torch.Tensor, delta: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """LSE' after adding delta to the candidates. (N, k), (N, k), (N,) -> (N,)."""
    # exp(LSE) - sum_c exp(l_c) is the mass of the unchanged tokens; computed relative to LSE for stability.
    rest = (1.0 - torch.exp(cand_logits - lse[:, None]).sum(-1)).clamp_min(0.0)  # (N,)
    moved = torch.exp(cand_logits + delta - lse[:, None]).sum(-1)  # (N,)
    return lse + torch.log(rest + moved)


def head_log_probs(
    cand_logits: torch.Tensor, delta: torch.Tensor, lse: torch.Tensor, token_logit: torch.Tensor,
    token_slot: torch.Tensor,
) -> torch.Tensor:
    """log p_theta(x_t) under a head correction. token_slot (N,): index of x_t in the candidates or -1.

    cand_logits, delta (N, k); lse, token_logit (N,) -> (N,).
    """
    in_cand = token_slot >= 0
    slot = token_slot.clamp_min(0)[:, None]
    token_delta = torch.where(in_cand, delta.gather(1, slot)[:, 0], torch.zeros_like(lse))
    return token_logit + token_delta - _adapted_lse(cand_logits, delta, lse)


def head_kl(cand_logits: torch.Tensor, delta: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_theta) per row under a head correction. (N, k), (N, k), (N,) -> (N,)."""
    p_cand = torch.exp(cand_logits - lse[:, None])  # (N, k)
    return (_adapted_lse(cand_logits, delta, lse) - lse) - (p_cand * delta).sum(-1)
