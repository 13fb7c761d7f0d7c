"""Distil a teacher's decisions at the decision points into a `head` or `lora` adapter (`fit --teacher M`).

Contract (DESIGN.md, "Teachers"):
- `teacher_scores(teacher, records, scored, cache_dir)`: one teacher-forced pass of the teacher over each
  rollout's exact ids gives, at every position j, the teacher's logits on the base's top-k candidates at j
  (`scored[i].cand`), float32 (P, k); a candidate id outside the teacher's vocabulary gets -inf. Cached
  beside the base scores in `cache_dir/teacher-<teacher signature>-<base signature>.pt`, keyed by the
  sequence's exact ids (score_cache.py), so a refit or a tau sweep runs no teacher forward.
- The loss of a sequence, no rewards needed: at each decision point (base entropy > tau),
  KL(q_T || q_A), with q_T the teacher's and q_A the adapted model's distribution renormalised over the
  base top-k candidates (what a gated teacher samples from at serving time); `target="argmax"` uses the
  cross-entropy of the teacher's best candidate instead. Elsewhere, the KL(p_base || p_adapted) anchor
  as in every fit, weight `kl_weight`. Every rollout weighs the same (rewards are not used).
- `candidate_kl` is also the diagnostic: `distill_diagnostics` reports its mean at decision points for
  the base and the adapted model, and the anchor KL.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .loss import head_kl, kl_anchor
from .score_cache import model_signature, save_atomic, sequence_key
from .scoring import Scored

__all__ = ["TARGETS", "candidate_kl", "distill_diagnostics", "head_distill_loss", "lora_distill_loss",
           "teacher_scores"]

TARGETS = ("kl", "argmax")
CHUNK = 256  # positions per LM-head chunk: never (S, V) float32 logits of a long rollout at once


def candidate_kl(teacher_cand: torch.Tensor, adapted_cand: torch.Tensor, target: str = "kl") -> torch.Tensor:
    """Per row: KL(softmax(teacher) || softmax(adapted)) over the k candidates, or (`argmax`) the adapted
    cross-entropy of the teacher's best candidate. (N, k), (N, k) -> (N,)."""
    log_a = torch.log_softmax(adapted_cand.float(), dim=-1)
    if target == "argmax":
        return -log_a.gather(1, teacher_cand.argmax(dim=-1, keepdim=True))[:, 0]
    log_t = torch.log_softmax(teacher_cand.float(), dim=-1)
    return (log_t.exp() * (log_t - log_a)).nansum(-1)  # a -inf teacher candidate has q_T = 0: it adds 0


@torch.no_grad()
def _teacher_cand(teacher, ids: list[int], cand: torch.Tensor) -> torch.Tensor:
    """The teacher's logits at every position of `ids` on that position's candidates. cand (P, k) -> (P, k)."""
    x = torch.tensor([ids], device=teacher.device)  # (1, S)
    hidden = teacher.get_decoder()(input_ids=x).last_hidden_state[0, :-1]  # (P, d_t)
    head = teacher.get_output_embeddings()
    cand = cand.to(teacher.device)
    inside = cand < head.weight.shape[0]
    out = []
    for start in range(0, hidden.shape[0], CHUNK):
        logits = head(hidden[start:start + CHUNK]).float()  # (c, V_t)
        c = cand[start:start + CHUNK]
        got = logits.gather(1, c.clamp_max(logits.shape[1] - 1))
        out.append(torch.where(inside[start:start + CHUNK], got, torch.full_like(got, float("-inf"))))
    return torch.cat(out).cpu()


def teacher_scores(teacher, base, records: Sequence[dict], scored: Sequence[Scored], top_k: int,
                   cache_dir: str | Path | None = None, progress: bool = True) -> list[torch.Tensor]:
    """The teacher's logits on the base candidates, (P, k) per record (see the module docstring)."""
    path = None
    if cache_dir:
        name = f"teacher-{model_signature(teacher, top_k, False)}-{model_signature(base, top_k, False)}.pt"
        path = Path(cache_dir) / name
    stored: dict[str, torch.Tensor] = torch.load(path, weights_only=True) if path and path.exists() else {}
    out, added = [], 0
    pairs = list(zip(records, scored, strict=True))
    for r, s in tqdm(pairs, desc="teacher scoring", unit="seq", disable=not progress):
        key = sequence_key(r["prompt_ids"], r["completion_ids"])
        if key not in stored:
            stored[key] = _teacher_cand(teacher, r["prompt_ids"] + r["completion_ids"], s.cand)
            added += 1
        out.append(stored[key].to(s.cand.device))
    if path and added:
        save_atomic(stored, path)
    if path and progress:
        print(f"teacher score cache {path}: {len(records) - added} of {len(records)} sequences reused, {added} added")
    return out


def head_distill_loss(w_u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kl_weight: float, target: str = "kl"):
    """The per-sequence distillation loss of a head adapter (A, B) on cached base and teacher scores."""
    def seq_loss(item):
        s = item.scored
        u = (s.hidden.float() @ a.T) @ b.T  # (P, d)
        delta = torch.einsum("pkd,pd->pk", w_u[s.cand].float(), u)  # (P, k)
        d = item.decision
        dec = candidate_kl(item.teacher[d], s.cand_logits[d] + delta[d], target).mean() if d.any() else u.new_zeros(())
        anc = head_kl(s.cand_logits[item.anchor], delta[item.anchor], s.lse[item.anchor]).mean()
        return dec + kl_weight * anc, dec.detach(), anc.detach()

    return seq_loss


def lora_distill_loss(peft_model, kl_weight: float, target: str = "kl", autocast=None):
    """The per-sequence distillation loss of a LoRA: adapted logits from a forward with the adapter on."""
    import contextlib

    def seq_loss(item):
        ids = torch.tensor([item.ids], device=peft_model.device)  # (1, S)
        ctx = autocast or contextlib.nullcontext
        with torch.no_grad(), peft_model.disable_adapter(), ctx():
            base = peft_model(input_ids=ids).logits[0, :-1].float()  # (P, V)
        with ctx():
            logits = peft_model(input_ids=ids).logits[0, :-1].float()  # (P, V)
        d = item.decision.to(logits.device)
        cand = item.scored.cand.to(logits.device)
        dec = (candidate_kl(item.teacher.to(logits.device)[d], logits[d].gather(1, cand[d]), target).mean()
               if d.any() else logits.new_zeros(()))
        anc = kl_anchor(base, logits, item.anchor.to(logits.device))
        return dec + kl_weight * anc, dec.detach(), anc.detach()

    return seq_loss


@torch.no_grad()
def distill_diagnostics(model, items, adapter) -> dict[str, float]:
    """On training items (head adapters): the mean KL(teacher || model) on the candidates at decision points
    for the base and for the adapted model, and the mean anchor KL(base || adapted)."""
    w_u = model.get_output_embeddings().weight
    base, adapted, anchor = [], [], []
    for it in items:
        s, d = it.scored, it.decision
        delta = adapter.delta(s.hidden, s.cand, w_u)
        if d.any():
            base.append(candidate_kl(it.teacher[d], s.cand_logits[d]))
            adapted.append(candidate_kl(it.teacher[d], s.cand_logits[d] + delta[d]))
        anchor.append(head_kl(s.cand_logits[it.anchor], delta[it.anchor], s.lse[it.anchor]))
    mean = lambda xs: float(torch.cat(xs).mean()) if xs else float("nan")  # noqa: E731
    return {"teacher_kl_base": mean(base), "teacher_kl_adapted": mean(adapted), "anchor_kl": mean(anchor)}
