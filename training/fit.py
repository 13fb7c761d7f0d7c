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
With a `checkpoint_dir` (head adapters), each run keeps its training state there after every checkpoint
(`loop.TrainState`, one file per tau: `tau-<tau>.pt`), and a rerun with the same settings and data continues
each run from its last checkpoint (a finished run's file ends it at once): a long sweep survives being stopped.
With a `teacher` (a causal LM with the base's tokenizer: `fit --teacher M`), step 1 keeps every problem
(no rewards are needed), step 4 is skipped, and the decision term is distill.py's: KL(teacher || adapted)
on the base top-k candidates at each decision point, the same anchor elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.manifest import GateSpec, Manifest, base_identity

from . import distill, loop
from .config import FitArgs
from .fit_lora import fit_lora
from .loss import group_advantages, head_kl, head_log_probs
from .score_cache import score_all
from .scoring import Scored, calibrate_tau

__all__ = ["FitArgs", "TrainItem", "advantages_of", "fit", "head_diagnostics", "make_items", "prepare_items",
           "select_problems", "trim_shortest"]

Callback = Callable[[int, Any], float | None]


@dataclass
class TrainItem:
    scored: Scored
    decision: torch.Tensor  # (P,) bool: completion positions with H > tau
    anchor: torch.Tensor  # (P,) bool: every other position (prompt included)
    advantage: float
    ids: list[int]
    problem_id: str = ""
    sample: int = 0
    teacher: torch.Tensor | None = None  # (P, k) a teacher's logits on the base candidates (distillation)

    @property
    def completion_len(self) -> int:
        return int(self.scored.entropy.numel() - (self.scored.prompt_len - 1))


def _length(r: dict) -> int:
    return len(r["completion_ids"]) if "completion_ids" in r else int(r.get("tokens", 0))


def select_problems(records: Sequence[dict], m: int) -> list[dict]:
    """Rollouts of the `m` mixed problems whose pass rate is closest to 0.5; ties broken as the released
    `select_mid_pool.py`: fewer truncated rollouts, then shorter mean completion, then problem id."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["problem_id"]].append(r)

    def key(pid: str) -> tuple:
        rs = groups[pid]
        rate = sum(r["reward"] for r in rs) / len(rs)
        return (abs(rate - 0.5), sum(bool(r.get("truncated")) for r in rs), sum(map(_length, rs)) / len(rs), pid)

    mixed = sorted((pid for pid, rs in groups.items() if 0 < sum(r["reward"] for r in rs) < len(rs)), key=key)
    if not mixed:
        raise ValueError(
            f"none of the {len(groups)} problems has mixed outcomes (pass rate strictly between 0 and 1): "
            "use more samples per problem, more or easier problems, or a stronger model"
        )
    return [r for pid in mixed[:m] for r in groups[pid]]


def trim_shortest(records: Sequence[dict], fraction: float) -> list[dict]:
    """The globally shortest `fraction` of `records` (round(fraction x n) of them), sorted as the released
    code sorts before cutting: by completion length, untruncated first, problem id, sample."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--trim must be a fraction in (0, 1], got {fraction}")
    if fraction == 1:
        return list(records)
    ordered = sorted(records, key=lambda r: (_length(r), bool(r.get("truncated")), str(r["problem_id"]),
                                             int(r.get("sample", 0))))
    return ordered[: round(fraction * len(ordered))]


def advantages_of(records: Sequence[dict], clip: float) -> list[float]:
    """Group-standardised advantages, one per record, within each problem's records as given."""
    out = [0.0] * len(records)
    by_problem: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_problem[r["problem_id"]].append(i)
    for idx in by_problem.values():
        for i, a in zip(idx, group_advantages([records[i]["reward"] for i in idx], clip), strict=True):
            out[i] = a
    return out


def make_items(records: Sequence[dict], scored: Sequence[Scored], args: FitArgs) -> tuple[list, float, dict]:
    """Decision sets at tau (`args.threshold`, or calibrated to `args.target_fire_rate`), advantages, items.
    No model needed: a tau sweep calls this once per tau on the same scores. Returns (items, tau, stats)."""
    completion_h = torch.cat([s.completion_entropy for s in scored])
    tau = args.threshold if args.threshold is not None else calibrate_tau(completion_h, args.target_fire_rate)
    advantages = advantages_of(records, args.adv_clip)
    items = []
    for r, s, a in zip(records, scored, advantages, strict=True):
        is_completion = torch.zeros_like(s.entropy, dtype=torch.bool)
        is_completion[s.completion] = True
        decision = is_completion & (s.entropy > tau)
        items.append(TrainItem(s, decision, ~decision, a, r["prompt_ids"] + r["completion_ids"],
                               str(r["problem_id"]), int(r.get("sample", 0))))
    stats = {
        "tau": tau, "fire_rate": float((completion_h > tau).float().mean()), "completion_tokens": completion_h.numel(),
        "sequences": len(items), "problems": len({r["problem_id"] for r in records}),
    }
    return items, tau, stats


def prepare_items(model, records: Sequence[dict], args: FitArgs, progress: bool = True,
                  score_cache: str | None = None) -> tuple[list, float, dict]:
    """Score the rollouts (reusing `score_cache`, see score_cache.py), set tau, compute advantages.
    Returns (items, tau, stats)."""
    scored = score_all(model, records, args.top_k, args.kind == "head", score_cache, progress)
    return make_items(records, scored, args)


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


def fit_head(model, tokenizer, items: list[TrainItem], tau: float, args: FitArgs, callback: Callback | None,
             loss=None, state: Path | None = None):
    """Train a head adapter on cached scores; `loss(w_u, a, b)` makes the per-sequence loss (default: the
    contrastive one, `_head_loss`); `state`: the file that keeps the run's state at each checkpoint, from which
    it continues (`loop.TrainState`)."""
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

    def restore(extra: dict) -> None:  # the best checkpoint so far, from a saved state
        best.update(step=extra["step"], value=extra["value"], adapter=HeadAdapter(manifest, extra["a"], extra["b"]))

    keep = None if state is None else loop.TrainState(
        state, _run_key(items, tau, args), lambda: {"step": best["step"], "value": best["value"],
                                                   "a": best["adapter"].A, "b": best["adapter"].B}, restore)
    seq_loss = loss(w_u, a, b) if loss else _head_loss(w_u, a, b, args.kl_weight)
    history = loop.run([a, b], items, args, seq_loss, on_checkpoint, "fit head", keep)
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


def _run_key(items: list[TrainItem], tau: float, args: FitArgs) -> dict:
    """What makes a training run the same run (loop.TrainState's key): its settings, tau and its data (each item's
    problem, sample, token ids and advantage, hashed)."""
    data = hashlib.sha256(json.dumps([[it.problem_id, it.sample, list(it.ids), float(it.advantage)] for it in items])
                          .encode()).hexdigest()
    return {"args": asdict(args), "tau": float(tau), "items": len(items), "data": data}


def _fit_one(model, tokenizer, items, tau: float, args: FitArgs, callback: Callback | None, distil: bool = False,
             checkpoint_dir: str | None = None):
    if args.kind == "head":
        loss = (lambda w_u, a, b: distill.head_distill_loss(w_u, a, b, args.kl_weight, args.teacher_target)) \
            if distil else None
        state = Path(checkpoint_dir) / f"tau-{tau:.6g}.pt" if checkpoint_dir else None
        return fit_head(model, tokenizer, items, tau, args, callback, loss, state)
    if checkpoint_dir:
        raise ValueError("a checkpoint folder resumes head fits; a LoRA fit restarts: drop --checkpoint-dir")
    loss = (lambda peft, autocast: distill.lora_distill_loss(peft, args.kl_weight, args.teacher_target, autocast)) \
        if distil else None
    return fit_lora(model, tokenizer, items, tau, args, callback, loss)


def distill_targets() -> tuple[str, ...]:
    return distill.TARGETS


def _with_teacher(items: list[TrainItem], teacher_logits: list[torch.Tensor]) -> list[TrainItem]:
    """Distillation items: the teacher's candidate logits attached, every rollout weighted 1 (no rewards)."""
    return [replace(it, teacher=t, advantage=1.0) for it, t in zip(items, teacher_logits, strict=True)]


class Run(NamedTuple):
    """One training run of `fit` (one per tau of a sweep)."""

    items: list[TrainItem]
    tau: float
    stats: dict[str, Any]  # make_items' data statistics
    adapter: Any  # the chosen checkpoint's adapter
    history: list[dict[str, float]]  # the losses, one entry per optimizer step
    chosen: dict[str, Any]  # the chosen checkpoint: {"step", "value"} (value: the callback's, None without one)


def fit(model, tokenizer, records: Sequence[dict], args: FitArgs, callback: Callback | None = None,
        provenance: dict | None = None, progress: bool = True, score_cache: str | None = None,
        tau_sweep: Sequence[float] | None = None, teacher=None, checkpoint_dir: str | None = None):
    """The whole fit: select, trim, score (reusing `score_cache` if given), set tau, train, pick the checkpoint.
    With `tau_sweep`, one adapter per tau from the one scoring pass, each with its own checkpoint choice; the
    one with the best validation value is returned and its manifest records the sweep. Returns (adapter, report)."""
    if args.kind not in ("head", "lora"):
        raise ValueError(f"unknown adapter kind {args.kind!r}: use head or lora")
    if tau_sweep and callback is None:
        raise ValueError("a tau sweep keeps the tau that does best on validation: give a validation split "
                         "(--val-problems FILE with --val-offset/--val-limit)")
    if args.teacher_target not in distill_targets():
        raise ValueError(f"unknown teacher target {args.teacher_target!r}: use one of {', '.join(distill_targets())}")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    selected = list(records) if teacher is not None else select_problems(records, args.keep_problems)
    kept = trim_shortest(selected, args.trim)
    scored = score_all(model, kept, args.top_k, args.kind == "head", score_cache, progress)
    if teacher is not None:
        teacher_logits = distill.teacher_scores(teacher, model, kept, scored, args.top_k, score_cache, progress)
    times["scoring_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    runs: list[Run] = []
    for threshold in (tau_sweep or [args.threshold]):
        run_args = replace(args, threshold=threshold)
        items, tau, stats = make_items(kept, scored, run_args)
        if teacher is not None:
            items = _with_teacher(items, teacher_logits)
        adapter, history, chosen = _fit_one(model, tokenizer, items, tau, run_args, callback, teacher is not None,
                                            checkpoint_dir)
        runs.append(Run(items, tau, stats, adapter, history, chosen))
    best = max(runs, key=lambda r: r.chosen["value"]) if tau_sweep else runs[0]
    items, tau, stats, adapter, history, chosen = best
    times["train_s"] = time.perf_counter() - t1
    stats.update(selected_sequences=len(selected), trimmed_to=len(kept),
                 trim_cutoff_tokens=max((_length(r) for r in kept), default=0))
    if args.kind == "head":
        stats["diagnostics"] = head_diagnostics(model, items, adapter)
        if teacher is not None:
            stats["diagnostics"].update(distill.distill_diagnostics(model, items, adapter))
    report = {"data": stats, "chosen_checkpoint": chosen, "times": times,
              "final": history[-1] if history else None, "steps": len(history)}
    if tau_sweep:
        report["tau_sweep"] = [{"tau": r.tau, "fire_rate": r.stats["fire_rate"], "chosen_checkpoint": r.chosen}
                               for r in runs]
    calibrated = args.threshold is None and not tau_sweep
    adapter.manifest.gate = GateSpec(tau=tau, target_fire_rate=args.target_fire_rate if calibrated else None,
                                     measured_fire_rate=stats["fire_rate"])
    adapter.manifest.provenance.update({**(provenance or {}), "args": asdict(replace(args, threshold=tau)
                                        if tau_sweep else args), "data": stats, "times": times, "losses": history})
    adapter.manifest.metrics.update({"chosen_checkpoint": chosen})
    if tau_sweep:
        adapter.manifest.metrics["tau_sweep"] = report["tau_sweep"]
    return adapter, report

