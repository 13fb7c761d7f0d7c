"""Fit a correction adapter from scored rollouts: `fit(model, tokenizer, records, args, callback=None)`.

Contract (DESIGN.md, "The idea"):
1. `select_problems`: keep problems whose pass rate is strictly between 0 and 1; the M closest to 0.5
   (ties broken by problem id), and all their rollouts.
2. Score every kept rollout teacher-forced on its exact ids (`scoring.score_sequence`).
3. tau = `args.threshold`, or calibrated so that `args.target_fire_rate` of completion tokens exceed it.
4. Advantages per problem group (`loss.group_advantages`, clipped).
5. Minimise, per sequence, mean_{t in D} -A log p(x_t) + kl_weight * mean_{t not in D} KL(p_base || p)
   (prompt positions included in the anchor) with AdamW, linear warm-up then linear decay, gradient
   clipping and accumulation, seeded. `head` trains from the cached hidden states (no forward pass per
   step); `lora` runs the model with and without the adapter (PEFT) each step.
6. At `args.checkpoints` evenly spaced points, `callback(step, adapter)` may score a validation split
   and return a number (higher is better): the best checkpoint is returned (the last one without).
The returned adapter carries tau, its calibration, provenance and losses in its manifest.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.manifest import GateSpec, Manifest, base_identity

from .loss import group_advantages, head_kl, head_log_probs
from .score_cache import score_all
from .scoring import Scored, calibrate_tau

__all__ = ["FitArgs", "TrainItem", "fit", "head_diagnostics", "prepare_items", "select_problems"]

Callback = Callable[[int, Any], float | None]


@dataclass
class FitArgs:
    kind: str = field(default="head", metadata={"help": "head | lora"})
    name: str = field(default="adapter", metadata={"help": "registered name of the adapter"})
    threshold: float | None = field(default=None, metadata={"help": "tau in nats; None = calibrate"})
    target_fire_rate: float = field(default=0.03, metadata={"help": "fraction of completion tokens above tau"})
    keep_problems: int = field(default=50, metadata={"help": "M: mixed problems kept, closest to pass rate 0.5"})
    adv_clip: float = field(default=2.5, metadata={"help": "advantages clipped to [-clip, clip]"})
    kl_weight: float = field(default=0.2, metadata={"help": "weight of the KL(base || adapted) anchor"})
    epochs: int = field(default=1, metadata={"help": "passes over the kept rollouts"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps (capped at a third of all steps)"})
    accumulation: int = field(default=8, metadata={"help": "sequences per optimizer step"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    seed: int = field(default=42, metadata={"help": "seed of init and data order"})
    top_k: int = field(default=5, metadata={"help": "head: candidates corrected per position"})
    rank: int = field(default=32, metadata={"help": "head rank, or LoRA r"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha"})
    lora_targets: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))
    checkpoints: int = field(default=1, metadata={"help": "evenly spaced checkpoints offered to the callback"})


@dataclass
class TrainItem:
    scored: Scored
    decision: torch.Tensor  # (P,) bool: completion positions with H > tau
    anchor: torch.Tensor  # (P,) bool: every other position (prompt included)
    advantage: float
    ids: list[int]


def select_problems(records: Sequence[dict], m: int) -> list[dict]:
    """Rollouts of the `m` mixed problems whose pass rate is closest to 0.5."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["problem_id"]].append(r)
    rates = {pid: sum(r["reward"] for r in rs) / len(rs) for pid, rs in groups.items()}
    mixed = sorted((pid for pid, rate in rates.items() if 0 < rate < 1), key=lambda p: (abs(rates[p] - 0.5), p))
    if not mixed:
        raise ValueError(
            f"none of the {len(groups)} problems has mixed outcomes (pass rate strictly between 0 and 1): "
            "use more samples per problem, more or easier problems, or a stronger model"
        )
    return [r for pid in mixed[:m] for r in groups[pid]]


def prepare_items(model, records: Sequence[dict], args: FitArgs, progress: bool = True,
                  score_cache: str | None = None) -> tuple[list, float, dict]:
    """Score the rollouts (reusing `score_cache`, see score_cache.py), set tau, compute advantages.
    Returns (items, tau, stats)."""
    scored = score_all(model, records, args.top_k, args.kind == "head", score_cache, progress)
    completion_h = torch.cat([s.completion_entropy for s in scored])
    tau = args.threshold if args.threshold is not None else calibrate_tau(completion_h, args.target_fire_rate)
    advantages: dict[int, float] = {}
    by_problem: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_problem[r["problem_id"]].append(i)
    for idx in by_problem.values():
        for i, a in zip(idx, group_advantages([records[i]["reward"] for i in idx], args.adv_clip), strict=True):
            advantages[i] = a
    items = []
    for i, (r, s) in enumerate(zip(records, scored, strict=True)):
        is_completion = torch.zeros_like(s.entropy, dtype=torch.bool)
        is_completion[s.completion] = True
        decision = is_completion & (s.entropy > tau)
        items.append(TrainItem(s, decision, ~decision, advantages[i], r["prompt_ids"] + r["completion_ids"]))
    stats = {
        "tau": tau, "fire_rate": float((completion_h > tau).float().mean()), "completion_tokens": completion_h.numel(),
        "sequences": len(items), "problems": len(by_problem),
    }
    return items, tau, stats


def _schedule(optimizer, warmup: int, total: int):
    warmup = min(warmup, max(1, total // 3))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train(params, items: list[TrainItem], args: FitArgs, seq_loss, on_checkpoint, desc: str) -> list[dict]:
    """The shared optimisation loop; `seq_loss(item) -> (loss, decision term, anchor term)` tensors."""
    rng = random.Random(args.seed)
    order = [i for _ in range(args.epochs) for i in rng.sample(range(len(items)), len(items))]
    total = math.ceil(len(order) / args.accumulation)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, args.warmup, total)
    marks = {round(total * (j + 1) / max(1, args.checkpoints)) for j in range(max(1, args.checkpoints))}
    history, bar = [], tqdm(total=total, desc=desc, unit="step")
    for step in range(1, total + 1):
        batch = order[(step - 1) * args.accumulation : step * args.accumulation]
        sums = torch.zeros(3)
        for i in batch:
            loss, dec, anc = seq_loss(items[i])
            (loss / len(batch)).backward()
            sums += torch.tensor([loss.item(), dec.item(), anc.item()]) / len(batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": sums[0].item(), "decision": sums[1].item(), "anchor": sums[2].item(),
                        "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]})
        bar.update(1)
        bar.set_postfix(loss=f"{sums[0]:.4f}", anchor=f"{sums[2]:.5f}")
        if step in marks:
            on_checkpoint(step)
    bar.close()
    return history


def _head_loss(w_u: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kl_weight: float):
    def seq_loss(item: TrainItem):
        s = item.scored
        u = (s.hidden.float() @ a.T) @ b.T  # (P, d)
        delta = torch.einsum("pkd,pd->pk", w_u[s.cand].float(), u)  # (P, k)
        dec = u.new_zeros(())
        if item.advantage != 0.0 and item.decision.any():
            d = item.decision
            logp = head_log_probs(s.cand_logits[d], delta[d], s.lse[d], s.token_logit[d], s.token_slot[d])
            dec = -(item.advantage * logp).mean()
        anc = head_kl(s.cand_logits[item.anchor], delta[item.anchor], s.lse[item.anchor]).mean()
        return dec + kl_weight * anc, dec.detach(), anc.detach()

    return seq_loss


def fit_head(model, tokenizer, items: list[TrainItem], tau: float, args: FitArgs, callback: Callback | None):
    torch.manual_seed(args.seed)
    d = int(model.config.hidden_size)
    w_u = model.get_output_embeddings().weight.detach()
    # Drawn on the CPU (the same init on every device), then trained where the cached hidden states are.
    a = (torch.randn(args.rank, d) / math.sqrt(d)).to(w_u.device).requires_grad_(True)
    b = torch.zeros(d, args.rank, device=w_u.device, requires_grad=True)
    manifest = Manifest(kind="head", name=args.name, base_model=base_identity(model, tokenizer),
                        gate=GateSpec(tau=tau), top_k=args.top_k, params={"rank": args.rank, "scale": 1.0})
    snapshot = lambda: HeadAdapter(manifest, a.detach().to("cpu", copy=True), b.detach().to("cpu", copy=True))  # noqa: E731
    best: dict[str, Any] = {}

    def on_checkpoint(step: int) -> None:
        adapter = snapshot()
        value = callback(step, adapter) if callback else None
        if not best or value is None or (best["value"] is not None and value > best["value"]):
            best.update(step=step, value=value, adapter=adapter)

    history = _train([a, b], items, args, _head_loss(w_u, a, b, args.kl_weight), on_checkpoint, "fit head")
    return best["adapter"], history, {"step": best["step"], "value": best["value"]}


@torch.no_grad()
def head_diagnostics(model, items: list[TrainItem], adapter: HeadAdapter) -> dict[str, float]:
    """On training items: mean change of log p at decision tokens of positive / negative advantage
    rollouts, and the mean KL(base || adapted) at anchor positions."""
    w_u = model.get_output_embeddings().weight
    pos, neg, kls = [], [], []
    for it in items:
        s = it.scored
        delta = adapter.delta(s.hidden, s.cand, w_u)
        shift = head_log_probs(s.cand_logits, delta, s.lse, s.token_logit, s.token_slot) - (s.token_logit - s.lse)
        if it.advantage:
            (pos if it.advantage > 0 else neg).append(shift[it.decision])
        kls.append(head_kl(s.cand_logits[it.anchor], delta[it.anchor], s.lse[it.anchor]))
    mean = lambda xs: float(torch.cat(xs).mean()) if xs and torch.cat(xs).numel() else float("nan")  # noqa: E731
    return {"logp_shift_positive": mean(pos), "logp_shift_negative": mean(neg), "anchor_kl": mean(kls)}


def fit(model, tokenizer, records: Sequence[dict], args: FitArgs, callback: Callback | None = None,
        provenance: dict | None = None, progress: bool = True, score_cache: str | None = None):
    """The whole fit: select, score (reusing `score_cache` if given), calibrate, train, pick the checkpoint.
    Returns (adapter, report)."""
    if args.kind not in ("head", "lora"):
        raise ValueError(f"unknown adapter kind {args.kind!r}: use head or lora")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    kept = select_problems(records, args.keep_problems)
    items, tau, stats = prepare_items(model, kept, args, progress, score_cache)
    times["scoring_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    if args.kind == "head":
        adapter, history, chosen = fit_head(model, tokenizer, items, tau, args, callback)
    else:
        from .fit_lora import fit_lora

        adapter, history, chosen = fit_lora(model, tokenizer, items, tau, args, callback)
    times["train_s"] = time.perf_counter() - t1
    if args.kind == "head":
        stats["diagnostics"] = head_diagnostics(model, items, adapter)
    report = {"data": stats, "chosen_checkpoint": chosen, "times": times,
              "final": history[-1] if history else None, "steps": len(history)}
    adapter.manifest.gate = GateSpec(tau=tau, target_fire_rate=None if args.threshold is not None
                                     else args.target_fire_rate, measured_fire_rate=stats["fire_rate"])
    adapter.manifest.provenance.update({**(provenance or {}), "args": asdict(args), "data": stats,
                                        "times": times, "losses": history})
    adapter.manifest.metrics.update({"chosen_checkpoint": chosen})
    return adapter, report
