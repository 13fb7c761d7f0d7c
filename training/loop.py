"""The one optimisation loop every fit runs (head and LoRA alike), and its data order and schedule.

Contract:
- `train_order(items, args)`: the sequence of item indices the loop visits, `args.epochs` passes:
  "shuffle" draws a seeded permutation per epoch; "curriculum" visits the items in the released code's
  fixed order every epoch (`curriculum_key`, descending: |A| x decision density, then |A|, then the number
  of decision points, then problem id and sample).
- `schedule_steps(n_items, args)`: (optimizer steps the learning-rate schedule is sized for, steps run,
  warm-up steps). The schedule spans `args.epochs` (ceil(items x epochs / accumulation) steps);
  `args.max_steps` > 0 stops it early (the released recipe sizes the decay for 2 epochs and stops at step
  149). The warm-up is `args.warmup`, capped at a third of the steps when `args.warmup_cap` (else at
  steps - 1, as transformers' linear schedule).
- `checkpoint_steps(n_items, args)`: every `args.checkpoint_every` of an epoch when it is > 0, else
  `args.checkpoints` evenly spaced; the last step run is always one.
- `run(params, items, args, seq_loss, on_checkpoint, desc, state)`: AdamW (weight decay 0), linear warm-up then
  linear decay, gradient accumulation over `args.accumulation` sequences, clipping at `args.grad_clip`;
  `seq_loss(item) -> (loss, decision term, anchor term)`; `on_checkpoint(step)` at each checkpoint step.
  Returns the per-step history (loss, decision, anchor, grad norm, lr).
- `TrainState(path, key, extra, restore)`: what `run` keeps after each checkpoint step, so a run stopped
  midway continues from its last checkpoint: the step, the parameters, the optimizer and schedule, the
  history and the caller's `extra()` (one file, replaced atomically). The data order and the schedule are
  functions of `args`, so the resumed run takes the steps the uninterrupted one would have. `key` (the run's
  settings and data) must match the file's: a file of another run is refused, never silently continued.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .score_cache import save_atomic

__all__ = ["TrainState", "checkpoint_steps", "curriculum_key", "run", "schedule_steps", "train_order"]


def curriculum_key(item: Any) -> tuple:
    """Sort key of the released `signal_clarity` curriculum (ascending sort = clearest signal first)."""
    n_decision = int(item.decision.sum())
    clarity = abs(item.advantage) * n_decision / max(1, item.completion_len)
    return (-clarity, -abs(item.advantage), -n_decision, str(item.problem_id), int(item.sample))


def train_order(items: Sequence[Any], args) -> list[int]:
    if args.order == "curriculum":
        fixed = sorted(range(len(items)), key=lambda i: curriculum_key(items[i]))
        return [i for _ in range(args.epochs) for i in fixed]
    if args.order != "shuffle":
        raise ValueError(f"unknown order {args.order!r}: use shuffle or curriculum")
    rng = random.Random(args.seed)
    return [i for _ in range(args.epochs) for i in rng.sample(range(len(items)), len(items))]


def schedule_steps(n_items: int, args) -> tuple[int, int, int]:
    """(steps the schedule is sized for, steps run, warm-up steps)."""
    total = max(1, math.ceil(n_items * args.epochs / args.accumulation))
    run_steps = min(total, args.max_steps) if args.max_steps and args.max_steps > 0 else total
    warmup = min(args.warmup, max(1, total // 3)) if args.warmup_cap else max(0, min(args.warmup, total - 1))
    return total, run_steps, warmup


def checkpoint_steps(n_items: int, args) -> set[int]:
    _, run_steps, _ = schedule_steps(n_items, args)
    if args.checkpoint_every and args.checkpoint_every > 0:
        every = max(1, round(args.checkpoint_every * n_items / args.accumulation))
        marks = set(range(every, run_steps + 1, every))
    else:
        n = max(1, args.checkpoints)
        marks = {round(run_steps * (j + 1) / n) for j in range(n)}
    return {m for m in marks if 1 <= m <= run_steps} | {run_steps}


def _lr_factor(total: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class TrainState:
    """A training run's state after its last checkpoint, in one file (see the module docstring). `extra()` returns
    the caller's part (tensors and plain values: e.g. the best checkpoint so far); `restore(extra)` takes it back."""

    def __init__(self, path: str | Path, key: dict, extra: Callable[[], dict], restore: Callable[[dict], None]):
        self.path, self.key = Path(path), json.loads(json.dumps(key, sort_keys=True, default=str))
        self.extra, self.restore = extra, restore

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        if saved["key"] != self.key:
            differ = sorted(k for k in set(saved["key"]) | set(self.key) if saved["key"].get(k) != self.key.get(k))
            raise ValueError(f"{self.path} holds a run with other settings ({', '.join(differ)} differ): remove it "
                             "to start this run over, or give another checkpoint folder")
        return saved

    def save(self, step: int, params, optimizer, scheduler, history: list[dict]) -> None:
        save_atomic({"key": self.key, "step": step, "params": [p.detach().cpu() for p in params],
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                     "extra": self.extra()}, self.path)


def run(params, items: Sequence[Any], args, seq_loss, on_checkpoint: Callable[[int], None], desc: str,
        state: TrainState | None = None) -> list[dict]:
    """The shared optimisation loop; see the module docstring."""
    order = train_order(items, args)
    total, run_steps, warmup = schedule_steps(len(items), args)
    marks = checkpoint_steps(len(items), args)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(total, warmup))
    history, start = [], 1
    saved = state.load() if state is not None else None
    if saved is not None:  # continue after the last checkpoint
        with torch.no_grad():
            for p, t in zip(params, saved["params"], strict=True):
                p.copy_(t)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history, start = saved["history"], saved["step"] + 1
        state.restore(saved["extra"])
    bar = tqdm(total=run_steps, initial=start - 1, desc=desc, unit="step")
    for step in range(start, run_steps + 1):
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
            if state is not None:
                state.save(step, params, optimizer, scheduler, history)
    bar.close()
    return history
