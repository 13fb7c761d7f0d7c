"""Teacher-forced scoring of rollouts under the base model, and tau calibration.

Contract: `score_sequence(model, prompt_ids, completion_ids)` runs the base model once over the exact
token ids (never re-tokenized text) and returns a `Scored` whose position j (0 <= j < S-1, S = prompt +
completion length) describes the distribution that predicts token j+1 of the sequence. Completion token i
is token len(prompt)+i, so it is predicted at position len(prompt)-1+i: `entropy[completion][i]` is the
entropy of the distribution from which completion token i was sampled (the same number the decode
engine's trace reports for token i). For `head` fitting it also keeps, per position, the final hidden
state h, the base top-k candidates c with their logits, the base log-sum-exp and the next token's logit
and slot in c (-1 if outside), so the head loss needs no further forward pass.
`calibrate_tau(entropies, target)` returns the threshold whose strict gate H > tau fires on the target
fraction of the given entropies (as nearly as ties allow).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reasonmaxxer.steering.gate import entropy, topk_candidates

__all__ = ["Scored", "calibrate_tau", "score_sequence"]


@dataclass
class Scored:
    """Per-position statistics of one sequence under the base model; positions 0..S-2 (see module doc)."""

    prompt_len: int
    entropy: torch.Tensor  # (P,) float32, P = S - 1
    hidden: torch.Tensor | None  # (P, d) final hidden state (model dtype), when kept
    cand: torch.Tensor  # (P, k) int64 base top-k
    cand_logits: torch.Tensor  # (P, k) float32
    lse: torch.Tensor  # (P,) float32 log-sum-exp of the base logits
    token_logit: torch.Tensor  # (P,) float32 base logit of the next token
    token_slot: torch.Tensor  # (P,) int64 index of the next token in cand, or -1

    @property
    def completion(self) -> slice:
        """Positions that predict the completion tokens (position of completion token i = start + i)."""
        return slice(self.prompt_len - 1, None)

    @property
    def completion_entropy(self) -> torch.Tensor:
        return self.entropy[self.completion]


@torch.no_grad()  # not inference_mode: the cached tensors feed autograd when fitting a head
def score_sequence(
    model, prompt_ids: Sequence[int], completion_ids: Sequence[int], top_k: int = 5, keep_hidden: bool = True
) -> Scored:
    """One teacher-forced base forward over prompt + completion (exact ids)."""
    if not prompt_ids or not completion_ids:
        raise ValueError("a rollout needs a non-empty prompt and completion to be scored")
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)], device=model.device)  # (1, S)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]  # (P, d)
    logits = model.get_output_embeddings()(hidden).float()  # (P, V)
    nxt = ids[0, 1:]  # (P,) token predicted at each position
    cand = topk_candidates(logits, top_k)  # (P, k)
    match = cand == nxt[:, None]  # (P, k)
    slot = torch.where(match.any(-1), match.int().argmax(-1), torch.full_like(nxt, -1))
    return Scored(
        prompt_len=len(prompt_ids),
        entropy=entropy(logits),
        hidden=hidden.clone() if keep_hidden else None,
        cand=cand,
        cand_logits=logits.gather(1, cand),
        lse=torch.logsumexp(logits, -1),
        token_logit=logits.gather(1, nxt[:, None])[:, 0],
        token_slot=slot,
    )


def calibrate_tau(entropies: torch.Tensor | Sequence[float], target: float) -> float:
    """The tau such that a fraction `target` of `entropies` is strictly above it."""
    h = torch.as_tensor(entropies, dtype=torch.float64).flatten().sort(descending=True).values
    if h.numel() == 0:
        raise ValueError("no entropies to calibrate tau on: score some rollouts first")
    if not 0.0 < target < 1.0:
        raise ValueError(f"the target fire rate must be in (0, 1), got {target}")
    n = max(1, round(target * h.numel()))  # tokens that should fire
    if n >= h.numel():
        return float(h[-1]) - 1e-6
    # Midway between the n-th highest and the next, so exactly the n highest exceed it (barring ties).
    return float((h[n - 1] + h[n]) / 2)
