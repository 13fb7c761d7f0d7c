"""The A/B comparison: the same prompts with the same seeds to every arm, scored, with statistics.

Contract: `run_ab(client, model, problems, arms, config, out_dir, score)` sends, for every problem and
sample, one request per arm (a chat request, or with `prompt_style="paper"` the paper's raw prompt on the
completions route with its `Human:` / `Assistant:` stops; same prompt, same seed: the arms are paired),
`config.concurrency` at a time, scores each answer with `score(text, gold, truncated)`, and appends it to
`out_dir/samples.jsonl` as soon as it is scored. Running again with the same arguments resumes: done
(arm, problem, sample) triples are skipped, nothing is duplicated. A folder is a pool of paired samples: a
later run may name other arms (added ones are sampled, left-out ones keep their samples; all stay paired,
since a sample's seed depends on the problem and sample index only); other problems or sampling settings are refused
(`out_dir/meta.json` lists every arm the folder has seen).
`aggregate(...)` gives per arm pass@1 with a 95% interval (problem-level bootstrap), the paired difference
against `base` with its interval and an exact McNemar p-value, fire rate (mean, and a histogram whose 20 bins
span the rates seen: `fire_rate_bins` are its edges), tokens per answer, tokens/s and latency percentiles, the
failure taxonomy (`failure_kind`: the share of answers wrong with a boxed answer, wrong without one, and
truncated), plus a few pairs where the outcomes disagree (`disagreements`) and a few where they agree but the
text differs (`differences`: what the gate did to an answer).
`write_outputs` writes `ab.json` (schema: `ab.schema.json` beside this file) and a self-contained `report.html`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from reasonmaxxer.training.prompts import PAPER_STOP, paper_prompt
from reasonmaxxer.training.verifier import last_boxed

from .report import plots, render, standalone
from .stats import bootstrap_mean, mcnemar_exact, paired_bootstrap, percentiles

__all__ = ["FAILURES", "AbConfig", "Arm", "against", "aggregate", "failure_kind", "failure_shares",
           "fire_rate_histogram", "load_samples", "paired", "parse_arms", "run_ab"]

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Arm:
    name: str
    adapter: str | None = None
    mode: str = "off"
    threshold: float | None = None
    rate: float | None = None  # mode random: fire probability (None: the adapter's measured fire rate)


def _arm(item: str) -> Arm:
    adapter, _, mode = item.partition(":")
    mode, _, value = (mode or "gated").partition("@")
    if mode not in ("gated", "always", "random") or (value and mode == "always"):
        raise ValueError(f"arm {item!r}: write ADAPTER:gated[@TAU], ADAPTER:always or ADAPTER:random[@RATE]")
    try:
        number = float(value) if value else None
    except ValueError as e:
        raise ValueError(f"arm {item!r}: the number after @ must be a threshold (gated) or a rate (random)") from e
    if mode == "random":
        if number is not None and not 0 <= number <= 1:
            raise ValueError(f"arm {item!r}: the random arm's rate must be a number in [0, 1]")
        return Arm(item, adapter, mode, rate=number)
    name = f"{adapter}:{mode}" + (f"@{number:g}" if number is not None else "")
    return Arm(name, adapter, mode, threshold=number)


def parse_arms(spec: str, thresholds: Sequence[float] = ()) -> list[Arm]:
    """`base,ADAPTER:gated[@TAU],ADAPTER:always,ADAPTER:random[@RATE]`. A gated arm without @TAU uses the
    adapter's own tau and also runs at every threshold of the sweep. `random` is the random-position
    control: it fires with probability RATE per token (default: the adapter's measured fire rate), whatever
    the entropy."""
    arms: list[Arm] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "base":
            arms.append(Arm("base"))
            continue
        arm = _arm(item)
        arms.append(arm)
        if arm.mode == "gated" and arm.threshold is None:
            arms += [Arm(f"{arm.adapter}:gated@{t:g}", arm.adapter, "gated", t) for t in thresholds]
    if not arms:
        raise ValueError("no arms: pass --arms base,ADAPTER:gated,...")
    if len({a.name for a in arms}) != len(arms):
        raise ValueError(f"arms repeat: {[a.name for a in arms]}")
    return arms


@dataclass
class AbConfig:
    samples: int = 1
    max_tokens: int = 384
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    concurrency: int = 8
    prompt_style: str = "chat"  # chat: /v1/chat/completions; paper: the raw prompt on /v1/completions


FAILURES = ("wrong_boxed", "wrong_unboxed", "truncated")


def failure_kind(text: str, reward: float, truncated: bool) -> str | None:
    """Why an answer failed: "truncated" (hit max tokens), "wrong_boxed" (a boxed answer, wrong), or
    "wrong_unboxed" (ended without a boxed answer); None for a right answer."""
    if reward > 0:
        return None
    if truncated:
        return "truncated"
    return "wrong_boxed" if last_boxed(text) is not None else "wrong_unboxed"


def failure_shares(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Share of all answers in each failure kind (they sum to 1 - pass@1)."""
    counts = dict.fromkeys(FAILURES, 0)
    for r in rows:
        kind = failure_kind(r["text"], r["reward"], r.get("finish_reason") == "length")
        if kind:
            counts[kind] += 1
    return {k: v / max(1, len(rows)) for k, v in counts.items()}


def _meta(model: str, problems, arms: list[Arm], config: AbConfig) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "model": model, "arms": [asdict(a) for a in arms],
            "config": asdict(config), "problems": {k: problems.selection.get(k) for k in
                                                     ("path", "sha256", "preset", "offset", "limit", "seed", "count")}}


def _merged(old: dict[str, Any], new: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The folder's meta with this run's arms added. Problems and sampling settings must not change; arms may
    be added or left out (a sample's seed depends on the problem and sample index alone, so every arm's
    samples stay paired with every other's); an arm name must keep its definition."""
    strip = lambda m: {k: v for k, v in m.items() if k not in ("config", "arms")}  # noqa: E731
    config = lambda m: {"prompt_style": "chat"} | {k: v for k, v in m["config"].items() if k != "concurrency"}  # noqa: E731
    if strip(old) != strip(new) or config(old) != config(new):
        raise ValueError(f"{out_dir} holds a run on other problems or with other sampling settings: "
                         "pass another --out or delete it")
    known = {a["name"]: a for a in old["arms"]}
    for arm in new["arms"]:
        if arm["name"] in known and known[arm["name"]] != arm:
            raise ValueError(f"{out_dir}: arm {arm['name']!r} was defined otherwise there: {known[arm['name']]}")
    return {**new, "arms": old["arms"] + [a for a in new["arms"] if a["name"] not in known]}


def load_samples(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete record of `out_dir/samples.jsonl`; an unterminated last line (a run cut off while
    writing it, or one still running) is not a record."""
    path = Path(out_dir) / "samples.jsonl"
    return _complete_records(path.read_text() if path.exists() else "")


def _complete_records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def _open(out_dir: Path, meta: dict[str, Any]) -> tuple[Any, set[tuple[str, str, int]]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path, samples = out_dir / "meta.json", out_dir / "samples.jsonl"
    if meta_path.exists():
        meta = _merged(json.loads(meta_path.read_text()), meta, out_dir)
    meta_path.write_text(json.dumps(meta, indent=2))
    text = samples.read_text() if samples.exists() else ""
    if text and not text.endswith("\n"):  # drop the cut-off line before appending
        samples.write_text(text[: text.rfind("\n") + 1])
    return samples.open("a"), {(r["arm"], r["problem_id"], r["sample"]) for r in _complete_records(text)}


def _ask(client, model: str, question: str, arm: Arm, config: AbConfig, seed: int):
    """One answer of `arm` to `question`: the chat prompt on the chat route, or the paper's raw prompt (and its
    stop strings) on the completions route."""
    steering = {"adapter": arm.adapter, "mode": arm.mode if arm.adapter else None, "threshold": arm.threshold,
                "trace": arm.mode != "off", "max_tokens": config.max_tokens, "temperature": config.temperature,
                "top_p": config.top_p, "seed": seed}
    if config.prompt_style == "paper":
        return client.complete(model, paper_prompt(question), stop=list(PAPER_STOP), rate=arm.rate, **steering)[0]
    if config.prompt_style != "chat":
        raise ValueError(f"prompt style {config.prompt_style!r}: use chat or paper")
    messages = [{"role": "user", "content": f"{question}\n\n{INSTRUCTION}"}]
    return client.chat(model, messages, rate=arm.rate, **steering)[0]


def run_ab(client, model: str, problems, arms: list[Arm], config: AbConfig, out_dir: str | Path,
           score: Callable[[str, str, bool], float], progress: bool = True) -> list[dict[str, Any]]:
    """Run the missing (arm, problem, sample) requests; return every record of the run."""
    out_dir = Path(out_dir)
    f, done = _open(out_dir, _meta(model, problems, arms, config))
    todo = [(arm, p, k) for p in problems.problems for k in range(config.samples) for arm in arms
            if (arm.name, p.id, k) not in done]
    lock = threading.Lock()

    def one(arm: Arm, problem, k: int) -> None:
        seed = config.seed * 1_000_003 + problem.index * 1009 + k  # the same for every arm: paired samples
        start = time.perf_counter()
        answer = _ask(client, model, problem.question, arm, config, seed)
        latency = time.perf_counter() - start
        truncated = answer.finish_reason == "length"
        record = {"arm": arm.name, "problem_id": problem.id, "sample": k, "seed": seed, "gold": problem.answer,
                  "text": answer.text, "finish_reason": answer.finish_reason, "tokens": answer.completion_tokens,
                  "gate_fired": answer.gate_fired, "fire_rate": answer.fire_rate, "latency_s": latency,
                  "reward": float(score(answer.text, problem.answer, truncated))}
        if (answer.steering or {}).get("teacher_tokens") is not None:  # a teacher arm: what it cost
            record["teacher_tokens"] = answer.steering["teacher_tokens"]
        trace = (answer.steering or {}).get("trace")
        if trace:  # where the gate fired, for the report's disagreement panel
            record["pieces"] = [t.get("text", "") for t in trace]
            record["fired_at"] = [t["position"] for t in trace if t["fired"]]
        with lock:
            f.write(json.dumps(record) + "\n")
            f.flush()

    with f, ThreadPoolExecutor(config.concurrency) as pool:
        futures = [pool.submit(one, *item) for item in todo]
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), desc="ab", unit="req", disable=not progress):
                fut.result()
        except BaseException:  # Ctrl-C (or a failed request): the queued requests are not sent
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return load_samples(out_dir)


HISTOGRAM_BINS = 20


def fire_rate_histogram(rates: Sequence[float], bins: int = HISTOGRAM_BINS) -> tuple[list[int], list[float]]:
    """Counts of per-answer fire rates in `bins` equal bins from 0 to the smallest of 0.05, 0.1, 0.2, 0.5, 1
    that holds them all (so a 3% rate spreads over bins of 0.25%), and the bin edges."""
    top = next((t for t in (0.05, 0.1, 0.2, 0.5) if all(x < t for x in rates)), 1.0)
    counts = [0] * bins
    for x in rates:
        counts[min(bins - 1, int(x / top * bins))] += 1
    return counts, [round(top * i / bins, 6) for i in range(bins + 1)]


def _arm_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rewards, groups = [r["reward"] for r in rows], [r["problem_id"] for r in rows]
    mean, (lo, hi) = bootstrap_mean(rewards, groups)
    rates = [r["fire_rate"] for r in rows]
    hist, edges = fire_rate_histogram(rates)
    tokens, latency = sum(r["tokens"] for r in rows), sum(r["latency_s"] for r in rows)
    return {"n": len(rows), "pass_at_1": mean, "ci95": [lo, hi], "fire_rate_mean": sum(rates) / max(1, len(rates)),
            "fire_rate_histogram": hist, "fire_rate_bins": edges, "tokens_per_answer": tokens / max(1, len(rows)),
            "tokens_per_s": tokens / latency if latency else 0.0,
            "latency_s": percentiles([r["latency_s"] for r in rows]), "failures": failure_shares(rows),
            **_teacher_cost(rows)}


def _teacher_cost(rows: list[dict[str, Any]]) -> dict[str, float]:
    """A teacher arm's cost: the tokens its teacher processed per answer and per generated token."""
    spent = [r["teacher_tokens"] for r in rows if r.get("teacher_tokens") is not None]
    if not spent:
        return {}
    tokens = sum(r["tokens"] for r in rows if r.get("teacher_tokens") is not None)
    return {"teacher_tokens_per_answer": sum(spent) / len(spent),
            "teacher_tokens_per_token": sum(spent) / max(1, tokens)}


def paired(reference: dict[tuple[str, int], dict[str, Any]], rows: dict[tuple[str, int], dict[str, Any]]
           ) -> dict[str, Any]:
    """`rows` against `reference` on the (problem, sample) pairs both answered (each keyed so): the mean paired
    difference with its problem-clustered bootstrap 95% CI, the exact McNemar p, and the discordant pairs
    (`fixed`: only `rows` right; `broken`: only `reference` right)."""
    keys = sorted(set(rows) & set(reference))
    a, b = [reference[k]["reward"] for k in keys], [rows[k]["reward"] for k in keys]
    diff, (lo, hi) = paired_bootstrap(a, b, [k[0] for k in keys])
    return {"pairs": len(keys), "diff": diff, "ci95": [lo, hi], "mcnemar_p": mcnemar_exact(a, b),
            "fixed": sum(y > x for x, y in zip(a, b, strict=True)),
            "broken": sum(x > y for x, y in zip(a, b, strict=True))}


def _by_arm(records: list[dict[str, Any]]) -> dict[str, dict[tuple[str, int], dict[str, Any]]]:
    """`records` by arm, each arm's keyed by (problem, sample)."""
    by_arm: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for r in records:
        by_arm.setdefault(r["arm"], {})[(r["problem_id"], r["sample"])] = r
    return by_arm


def against(records: list[dict[str, Any]], reference: str) -> dict[str, dict[str, Any]]:
    """Every other arm of `records` paired against the arm named `reference` (see `paired`)."""
    by_arm = _by_arm(records)
    if reference not in by_arm:
        raise ValueError(f"no arm {reference!r} to compare against; the arms are {sorted(by_arm)}")
    return {name: paired(by_arm[reference], rows) for name, rows in by_arm.items() if name != reference}


def aggregate(records: list[dict[str, Any]], arms: list[Arm], examples: int = 5) -> dict[str, Any]:
    by_arm = {a.name: {} for a in arms} | _by_arm(records)
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "arms": {}, "disagreements": [], "differences": []}
    base = by_arm.get("base")
    for arm in arms:
        rows = by_arm[arm.name]
        stats = {"adapter": arm.adapter, "mode": arm.mode, "threshold": arm.threshold,
                 **_arm_stats(list(rows.values()))}
        if base is not None and arm.name != "base":
            stats["vs_base"] = paired(base, rows)
            _examples(out, arm.name, sorted(set(rows) & set(base)), base, rows, examples)
        out["arms"][arm.name] = stats
    return out


def _examples(out: dict[str, Any], arm: str, keys, base, rows, limit: int) -> None:
    """Append to out["disagreements"] pairs whose outcomes differ, and to out["differences"] pairs with the same
    outcome whose texts differ (the gate changed the answer without changing its score), fired pairs first."""
    def example(k):
        return {"arm": arm, "problem_id": k[0], "sample": k[1], "gold": rows[k]["gold"], "base_text": base[k]["text"],
                "arm_text": rows[k]["text"], "base_reward": base[k]["reward"], "arm_reward": rows[k]["reward"],
                "arm_pieces": rows[k].get("pieces"), "arm_fired_at": rows[k].get("fired_at")}

    differ = [k for k in keys if base[k]["reward"] != rows[k]["reward"]]
    out["disagreements"] += [example(k) for k in differ[: max(0, limit - len(out["disagreements"]))]]
    same = [k for k in keys if base[k]["reward"] == rows[k]["reward"] and base[k]["text"] != rows[k]["text"]]
    same.sort(key=lambda k: not rows[k].get("fired_at"))
    out["differences"] += [example(k) for k in same[: max(0, limit - len(out["differences"]))]]


def write_outputs(summary: dict[str, Any], out_dir: str | Path, title: str = "ReasonMaxxer A/B") -> None:
    out_dir = Path(out_dir)
    (out_dir / "ab.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "report.html").write_text(render(summary, title))
    (out_dir / "plots").mkdir(exist_ok=True)
    for stem, svg in plots(summary).items():
        (out_dir / "plots" / f"{stem}.svg").write_text(standalone(svg))
