"""Rollouts: K samples per problem from the frozen base, scored 0/1 by the verifier, written as JSONL.

Contract:
- The output file starts with one `{"meta": ...}` line (model identity, sampling settings, prompt
  style, problem selection), then one line per rollout: problem id and row, sample index, seed,
  question, gold answer, the exact `prompt_ids` and `completion_ids`, text, finish reason, `truncated`
  (hit max tokens) and `reward` (1.0 or 0.0; truncated or missing answer = 0). An `--out` ending in `.gz`
  is the compact form a run keeps in `runs/` (records.py): the same lines less `question` and `text`.
- Each rollout is written and flushed as soon as it finishes, so an interrupted run loses at most the
  rollouts in flight. Running again with the same arguments resumes: the meta line must match (else a
  clear error), a torn last line is cut off, and only the missing (problem, sample) pairs run. Sample
  seeds are a function of (seed, row, sample), so a resumed run draws what the uninterrupted run would.
- `resume_check(out, problems, config)`, before any model loads: how many of this run's rollouts `out`
  already holds; ValueError when it holds a run on other problems or with other sampling settings.
- Progress counts tokens: the bar's total is the token budget of the sequences still to run (it shrinks when
  one ends early), so its rate is generated tokens per second and its estimate an upper bound.
- `summarize(records)` gives pass@1, pass@k, the number of problems with mixed outcomes, and more.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request, SteeringParams, TokenEvent
from reasonmaxxer.steering.sampling import SamplingParams

from . import records as records_io
from .config import RolloutConfig
from .problems import Problem, ProblemSet
from .prompts import build_prompt_ids, default_stop, prompt_style_for

__all__ = ["RolloutConfig", "completed", "evaluate", "generate", "load_rollouts", "resume_check", "run_rollouts",
           "summarize"]


def sample_seed(seed: int, row: int, sample: int) -> int:
    return (seed * 1_000_003 + row * 1009 + sample) % (2**63)


def resolved_stop(tokenizer, config: RolloutConfig) -> tuple[str, ...]:
    """The stop strings a rollout ends at: ``config.stop``, else the prompt style's default."""
    if config.stop is not None:
        return tuple(config.stop)
    return default_stop(prompt_style_for(tokenizer, config.prompt_style))


def _settings(tokenizer, config: RolloutConfig) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(config).items() if k != "concurrency"}
    settings["prompt_style"] = prompt_style_for(tokenizer, config.prompt_style)
    settings["stop"] = list(resolved_stop(tokenizer, config))
    return settings


def _meta(engine: Engine, problems: ProblemSet, config: RolloutConfig) -> dict[str, Any]:
    return {"model": asdict(engine.identity), "sampling": _settings(engine.tokenizer, config),
            "problems": problems.selection}


def completed(out: str | Path, problems: ProblemSet, config: RolloutConfig, tokenizer) -> dict[str, Any] | None:
    """`summarize` of `out` when it already holds every rollout of this run (same sampling settings and
    problems): the caller can skip starting an engine. None otherwise (including a run with other settings,
    which `run_rollouts` then refuses with its reason)."""
    out = Path(out)
    if not out.exists():
        return None
    meta, records = load_rollouts(out)
    same = meta["sampling"] == _settings(tokenizer, config) and all(
        meta["problems"].get(k) == problems.selection.get(k) for k in ("sha256", "offset", "limit", "seed", "preset"))
    done = {(r["problem_id"], r["sample"]) for r in records}
    if not same or any((p.id, k) not in done for p in problems.problems for k in range(config.samples)):
        return None
    return summarize(records)


def resume_check(out: str | Path, problems: ProblemSet, config: RolloutConfig) -> int:
    """The number of this run's (problem, sample) pairs already in `out` (0 without a file). ValueError when
    the file is of another run: problem selection or the sampling settings that need no tokenizer differ."""
    out = Path(out)
    if not out.exists() or out.stat().st_size == 0:
        return 0
    meta, records = load_rollouts(out)
    old, new = meta.get("sampling", {}), asdict(config)
    keys = ["samples", "temperature", "top_p", "max_new_tokens", "seed"] + (
        ["prompt_style"] if config.prompt_style != "auto" else [])
    changed = [k for k in keys if k in old and old[k] != new[k]]
    changed += [k for k in ("sha256", "offset", "limit", "seed", "preset")
                if meta.get("problems", {}).get(k) != problems.selection.get(k)]
    if changed:
        raise ValueError(f"{out} holds a run with other settings ({', '.join(sorted(set(changed)))} differ): pass "
                         "another --out, or delete it to start over")
    wanted = {(p.id, k) for p in problems.problems for k in range(config.samples)}
    return len(wanted & {(r["problem_id"], r["sample"]) for r in records})


def _same_run(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why two meta lines describe different runs, or None if they match."""
    if old["model"]["fingerprint"] != new["model"]["fingerprint"]:
        return f"it was made with model {old['model']['name']!r}, not {new['model']['name']!r}"
    if old["sampling"] != new["sampling"]:
        return f"its sampling settings differ ({old['sampling']} vs {new['sampling']})"
    for key in ("sha256", "offset", "limit", "seed", "preset"):
        if old["problems"].get(key) != new["problems"].get(key):
            return f"its problem selection differs in {key!r}"
    return None


def load_rollouts(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read a rollout file, plain or compact (`.gz`, records.py): (meta, records). A torn last line or member
    (an interrupted write) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rollout file {path} does not exist: run `reasonmaxxer rollouts` first")
    lines = records_io.read_lines(path)
    if not lines or not lines[0].startswith('{"meta"'):
        raise ValueError(f"{path} is not a rollout file (its first line must be the meta line)")
    meta = json.loads(lines[0])["meta"]
    records = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{i} is not valid JSON; the file is damaged") from None
    return meta, records


def _open_output(path: Path, meta: dict[str, Any]) -> tuple[Any, set[tuple[str, int]]]:
    """Open for appending (binary; records.append writes), resuming a matching earlier run. Returns (file,
    done pairs)."""
    done: set[tuple[str, int]] = set()
    if path.exists() and path.stat().st_size > 0:
        old_meta, records = load_rollouts(path)
        why = _same_run(old_meta, meta)
        if why:
            raise ValueError(f"{path} exists but {why}: pass another --out, or delete it to start over")
        records_io.truncate_torn(path)
        done = {(r["problem_id"], r["sample"]) for r in records}
        return path.open("ab"), done
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("wb")
    records_io.append(f, {"meta": meta}, records_io.is_compact(path))
    return f, done


def _todo(problems: ProblemSet, samples: int, done: set[tuple[str, int]]) -> Iterator[tuple[Problem, int]]:
    for p in problems.problems:
        for k in range(samples):
            if (p.id, k) not in done:
                yield p, k


def decode_all(engine, items: Iterable[Any], concurrency: int, make_request: Callable[[Any], Request],
               on_token: Callable[[], object] | None = None) -> Iterator[tuple[Any, Request, list[int], TokenEvent]]:
    """Decode one request per item, `concurrency` at a time, on an engine with `submit`/`step` (ours, or
    the offline vLLM one); yield each as it finishes: (item, request, completion ids, last event).
    `on_token()` is called for every token generated (progress)."""
    inflight: dict[str, tuple[Any, Request, list[int]]] = {}
    queue = iter(items)
    while True:
        while len(inflight) < concurrency and (item := next(queue, None)) is not None:
            req = make_request(item)
            inflight[engine.submit(req)] = (item, req, [])
        if not inflight:
            return
        for event in engine.step():
            if event.request_id not in inflight:
                continue
            item, req, ids = inflight[event.request_id]
            if event.token_id is not None:
                ids.append(event.token_id)
                if on_token is not None:
                    on_token()
            if event.finished:
                del inflight[event.request_id]
                yield item, req, ids, event


def generate(
    engine: Engine, items: Iterable[tuple[Problem, int]], config: RolloutConfig,
    steering: SteeringParams | None = None, on_token: Callable[[], object] | None = None,
) -> Iterator[tuple[Problem, int, Request, list[int], TokenEvent]]:
    """Decode (problem, sample) items, `config.concurrency` at a time; yield each as it finishes:
    (problem, sample, request, completion ids, last event (finish reason, gate report))."""
    make = lambda item: _request(engine, config, *item, steering)  # noqa: E731
    for (problem, k), req, ids, last in decode_all(engine, items, config.concurrency, make, on_token):
        yield problem, k, req, ids, last


def run_rollouts(
    engine: Engine,
    problems: ProblemSet,
    config: RolloutConfig,
    out: str | Path,
    score: Callable[[str, str, bool], float],
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, score and append the missing rollouts; return `summarize` of the whole file."""
    out = Path(out)
    f, done = _open_output(out, _meta(engine, problems, config))
    compact = records_io.is_compact(out)
    todo = list(_todo(problems, config.samples, done))
    bar = tqdm(total=len(todo) * config.max_new_tokens, desc="rollouts", unit="tok", unit_scale=True,
               disable=not progress, postfix=f"0/{len(todo)} sequences")
    finished = 0
    try:
        with f:
            for problem, k, req, ids, last in generate(engine, todo, config, on_token=lambda: bar.update(1)):
                record = _record(engine, problem, k, req, ids, last.finish_reason, score)
                records_io.append(f, records_io.compact(record) if compact else record, compact)
                finished += 1
                bar.total -= config.max_new_tokens - len(ids)  # an early end frees the rest of its budget
                bar.set_postfix_str(f"{finished}/{len(todo)} sequences")
    finally:
        bar.close()
    _, records = load_rollouts(out)
    return summarize(records)


def evaluate(
    engine: Engine, problems: ProblemSet, config: RolloutConfig, score: Callable[[str, str, bool], float],
    steering: SteeringParams | None = None, progress: bool = False,
) -> dict[str, Any]:
    """pass@1 (and the gate's fire rate) of `config.samples` samples per problem, nothing written."""
    items = list(_todo(problems, config.samples, set()))
    rewards, fired, tokens = [], 0, 0
    for problem, _, _, ids, last in tqdm(generate(engine, items, config, steering), total=len(items),
                                         desc="evaluate", unit="seq", disable=not progress):
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        rewards.append(float(score(text, problem.answer, last.finish_reason == "length")))
        tokens += len(ids)
        fired += last.report.gate_fired
    n = max(1, len(rewards))
    return {"pass@1": sum(rewards) / n, "samples": len(rewards), "tokens": tokens, "fire_rate": fired / max(1, tokens)}


def _request(
    engine: Engine, config: RolloutConfig, problem: Problem, k: int, steering: SteeringParams | None = None
) -> Request:
    ids = build_prompt_ids(engine.tokenizer, problem.question, config.prompt_style)
    sp = SamplingParams(
        max_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
        seed=sample_seed(config.seed, problem.index, k), stop=resolved_stop(engine.tokenizer, config),
    )
    return Request(ids, sp, steering or SteeringParams())


def _record(
    engine: Engine, problem: Problem, k: int, req: Request, completion: list[int], finish_reason: str,
    score: Callable[[str, str, bool], float],
) -> dict[str, Any]:
    truncated = finish_reason == "length"
    text = engine.tokenizer.decode(completion, skip_special_tokens=True)
    return {
        "problem_id": problem.id, "row": problem.index, "sample": k, "seed": req.sampling.seed,
        "question": problem.question, "gold": problem.answer, "prompt_ids": req.prompt_ids,
        "completion_ids": completion, "text": text, "finish_reason": finish_reason, "truncated": truncated,
        "reward": float(score(text, problem.answer, truncated)),
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """pass@1, pass@k, problems with mixed outcomes, mean completion tokens, truncation rate."""
    by_problem: dict[str, list[float]] = defaultdict(list)
    for r in records:
        by_problem[r["problem_id"]].append(r["reward"])
    rates = [sum(v) / len(v) for v in by_problem.values()]
    n = max(1, len(records))
    return {
        "problems": len(by_problem),
        "rollouts": len(records),
        "pass@1": sum(r["reward"] for r in records) / n,
        "pass@k": sum(rate > 0 for rate in rates) / max(1, len(rates)),
        "mixed_problems": sum(0 < rate < 1 for rate in rates),
        "mean_completion_tokens": sum(len(r["completion_ids"]) for r in records) / n,
        "truncated": sum(r["truncated"] for r in records) / n,
    }
