"""What `rollouts` and `fit` check and say before and after the long part (no torch, no model).

Contract:
- `check_output(path, kind)`: `path` ("file" or "dir") can be written: it is not the other kind, and the
  nearest existing folder above it is writable. ValueError saying what to pass instead.
- `check_backends(engine, val_backend)`: no engine flag goes unread (--vllm-args need a vLLM engine, --fast
  an embedded one); ValueError naming the flag.
- `check_sampling(rollouts, fit)`: the rollout flags of a `rollouts` (or `fit`: with its `FitConfig`) run are in
  range, the verifier's extractors exist, and the flags go together (`check_backends`, validation flags need
  --val-problems); ValueError naming the flag.
- `plan(problems, samples, max_tokens, done, out, limited)`: the line printed before sampling starts: how
  many sequences, how many already done, the token budget, and a hint when no --limit was given.
- `warnings(summary, args)`: what a rollout summary says is wrong for a fit (no or few mixed problems, heavy
  truncation), each naming the flag to change; [] when all is well.
- `interrupted(out, done, total, command)`: the one line printed on Ctrl-C.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .verifier import EXTRACTORS

if TYPE_CHECKING:
    from .cli_config import EngineConfig, FitConfig, RolloutsConfig

__all__ = ["FEW_MIXED", "HEAVY_TRUNCATION", "check_backends", "check_output", "check_sampling", "interrupted", "plan",
           "warnings"]

FEW_MIXED = 3  # fewer mixed problems than this: a fit has little to learn from
HEAVY_TRUNCATION = 0.3  # share of rollouts that hit the token budget


def check_output(path: str | Path, kind: str = "file") -> None:
    """ValueError unless `path` can be written as a `kind` ("file" or "dir"), without creating anything."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise ValueError(f"--out {path} is a folder: give a file path, e.g. {path / 'rollouts.jsonl'}")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file: give a folder path for the adapter")
    if path.exists():  # resumed, or replaced
        if not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise ValueError(f"cannot write {path}: it is not writable by this user; pass another --out")
        return
    target = path.parent
    while not target.exists():
        target = target.parent
    if not target.is_dir() or not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: {target} is not a writable folder; pass another --out")


def check_backends(engine: EngineConfig, val_backend: str | None = None) -> None:
    """Engine flags that no engine of the run reads (its --backend, and fit's --val-backend): refused."""
    backends = {engine.backend, val_backend or engine.backend}
    if engine.vllm_args and "vllm" not in backends:
        raise ValueError("--vllm-args are vLLM engine arguments: add --backend vllm, or leave them out")
    if engine.fast and "transformers" not in backends:
        raise ValueError("--fast picks the embedded (transformers) engine's fast paths, and --backend vllm runs "
                         "none: leave --fast out")


def check_sampling(rollouts: RolloutsConfig, fit: FitConfig | None = None) -> None:
    """The rollout settings of a run (the recipe applied): in range, known extractors; `fit`'s validation flags
    need its --val-problems."""
    s = rollouts.sampling
    checks = [("--samples", s.samples >= 1, "at least 1"), ("--max-tokens", s.max_new_tokens >= 1, "at least 1"),
              ("--temperature", s.temperature >= 0, "0 (greedy) or more"),
              ("--top-p", 0 < s.top_p <= 1, "in (0, 1]"),
              ("--concurrency", rollouts.engine.concurrency >= 1, "at least 1")]
    for flag, ok, want in checks:
        if not ok:
            raise ValueError(f"{flag} must be {want}")
    check_backends(rollouts.engine, fit.val_backend if fit else None)
    if fit is not None and fit.val.path is None:
        v = fit.val
        given_val = [flag for flag, value in (("--val-limit", v.limit), ("--val-preset", v.preset),
                                              ("--val-question-field", v.question_field),
                                              ("--val-answer-field", v.answer_field)) if value is not None]
        if given_val:
            raise ValueError(f"{', '.join(given_val)} select validation problems: add --val-problems FILE")
    names = [x.strip() for x in rollouts.verifier_fallbacks.split(",") if x.strip()]
    unknown = [n for n in names if n not in EXTRACTORS]
    if unknown or not names:
        raise ValueError(f"--verifier-fallbacks {rollouts.verifier_fallbacks!r}: use names among "
                         f"{', '.join(EXTRACTORS)}, comma-separated (e.g. boxed,answer_is,last_number)")


def plan(problems: int, samples: int, max_tokens: int, done: int, out: str | Path, limited: bool) -> str:
    """The line that says what a rollout run will do, before it starts."""
    total = problems * samples
    todo = total - min(done, total)
    line = (f"rollouts: {problems} problems x {samples} samples = {total:,} sequences of up to {max_tokens} tokens "
            f"-> {out}")
    if done:
        line += f" ({done:,} already there: {todo:,} to sample)"
    line += f"; at most {todo * max_tokens:,} tokens"
    if not limited and total > 500:
        line += ". No --limit was given: pass --limit N to try a few problems first"
    return line


def warnings(summary: dict[str, Any], samples: int, max_tokens: int) -> list[str]:
    """Warnings, each naming what to change, for a rollout summary that a fit would struggle with."""
    out: list[str] = []
    truncated, mixed = summary.get("truncated", 0.0), summary.get("mixed_problems", 0)
    if truncated >= HEAVY_TRUNCATION:
        out.append(f"WARNING: {truncated:.0%} of the rollouts hit --max-tokens {max_tokens} and scored 0: raise "
                   "--max-tokens (or use shorter problems)")
    if mixed < FEW_MIXED:
        what = "no problem has" if mixed == 0 else f"only {mixed} of {summary.get('problems', '?')} problems have"
        out.append(f"WARNING: {what} mixed outcomes (some rollouts right, some wrong; pass@1 "
                   f"{summary.get('pass@1', 0.0):.3f}), and a fit learns only from those. Use easier problems "
                   f"(another file or --offset/--limit range), more --samples than {samples}, or more --max-tokens")
    return out


def interrupted(out: str | Path, done: int, total: int, command: Sequence[str]) -> str:
    """The one line printed when a run is stopped with Ctrl-C."""
    return (f"interrupted: {done:,} of {total:,} rollouts are kept in {out}; run the same command to resume: "
            f"{shlex.join(command)}")
