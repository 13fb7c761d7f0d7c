"""The causal test of the paper's premise: branch base answers at decision points and at random positions.

Contract:
- `pick_answers(records, wrong, right, per_problem, seed)`: from finished (not truncated) rollouts, `wrong`
  wrong and `right` right answers, at most `per_problem` of each kind per problem, drawn with `seed`, in
  alternating kinds (branches run in answer order, so a run cut short holds both kinds alike).
- `pick_positions(entropy, tau, n, rng)`: (decision positions, random positions) of one answer's completion:
  up to `n` completion indices whose base entropy is > tau, and as many drawn uniformly from all of its
  indices, both with the given `random.Random`. The last index (usually EOS) is never a branch point.
- `branch_points(scored, completion_ids, tau, n, alternatives, rng)`: for each chosen position, the
  candidates to force there: the sampled token itself (the resampling control) and the `alternatives` most
  likely base tokens other than it (the base's top-2..top-(alternatives+1) when the sampled one is top-1).
- `run_probe(engine, answers, points, config, score, out)`: for every (answer, point, candidate), decodes
  `config.continuations` continuations of prompt + completion[:i] + [candidate] with the answer's own
  sampling settings and a completion budget that keeps the answer's total length budget; scores the
  completion (completion[:i] + [candidate] + continuation) and appends one record per continuation to
  `out` (JSONL, resumable: a rerun skips records already there). Each record carries the answer, the
  kind of point (decision | random), position, entropy, candidate, its base rank and probability,
  whether it is the sampled token, the continuation's seed, ids, reward and finish reason.
Seeds: a continuation's seed is a function of (seed, answer, position, candidate, k) only, so a resumed run
draws what an uninterrupted one would, and every candidate at a point is continued with the same seeds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from reasonmaxxer.steering.request import Request
from reasonmaxxer.steering.sampling import SamplingParams

from .config import ProbeConfig
from .rollouts import decode_all
from .scoring import score_sequence

__all__ = ["Branch", "ProbeConfig", "branch_points", "pick_answers", "pick_positions", "run_probe"]


@dataclass(frozen=True)
class Branch:
    answer: int  # index into the answers list
    kind: str  # "decision" | "random"
    position: int  # completion index whose token is forced
    entropy: float
    candidate: int  # the forced token id
    rank: int  # its rank in the base distribution (1 = most likely)
    prob: float  # its base probability
    sampled: bool  # the candidate is the token the answer had there


def pick_answers(records: Sequence[dict], wrong: int, right: int, per_problem: int, seed: int) -> list[dict]:
    """Finished rollouts: `wrong` wrong and `right` right ones, at most `per_problem` of each per problem."""
    rng = random.Random(seed)
    pool = [r for r in records if not r.get("truncated")]
    rng.shuffle(pool)
    out, used = [], defaultdict(int)
    want = {0.0: wrong, 1.0: right}
    for r in pool:
        kind = float(r["reward"] > 0)
        if want[kind] > 0 and used[(r["problem_id"], kind)] < per_problem:
            out.append(r)
            want[kind] -= 1
            used[(r["problem_id"], kind)] += 1
    if want[0.0] or want[1.0]:
        raise ValueError(f"the rollouts have too few finished answers: {want[0.0]} wrong and {want[1.0]} right ones "
                         f"are missing (at most {per_problem} per problem); use more rollouts or --per-problem")
    wrongs, rights = [r for r in out if r["reward"] <= 0], [r for r in out if r["reward"] > 0]
    mixed = [r for pair in itertools.zip_longest(wrongs, rights) for r in pair if r is not None]
    return mixed  # alternating kinds: a run cut short has as many of each


def pick_positions(entropy: torch.Tensor, tau: float, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(decision, random) completion indices of one answer; `entropy` (C,) per completion token."""
    last = int(entropy.numel()) - 1  # the final token (EOS) is not a branch point
    above = [i for i in range(last) if float(entropy[i]) > tau]
    decision = sorted(rng.sample(above, min(n, len(above))))
    randoms = sorted(rng.sample(range(last), min(len(decision), last))) if last > 0 else []
    return decision, randoms


def branch_points(scored, completion_ids: Sequence[int], answer: int, tau: float, n: int, alternatives: int,
                  rng: random.Random) -> list[Branch]:
    """Every (point, candidate) to continue for one answer. `scored` from `score_sequence(top_k >= alts + 1)`."""
    h = scored.completion_entropy  # (C,)
    start = scored.prompt_len - 1
    decision, randoms = pick_positions(h, tau, n, rng)
    out = []
    for kind, positions in (("decision", decision), ("random", randoms)):
        for i in positions:
            token = int(completion_ids[i])
            cand = scored.cand[start + i].tolist()  # (k,) base top-k, most likely first
            logp = scored.cand_logits[start + i] - scored.lse[start + i]
            probs = {c: float(p) for c, p in zip(cand, logp.exp().tolist(), strict=True)}
            alts = [c for c in cand if c != token][:alternatives]
            rank = cand.index(token) + 1 if token in cand else 0  # 0: outside the base top-k
            sampled_prob = float(torch.exp(scored.token_logit[start + i] - scored.lse[start + i]))
            out.append(Branch(answer, kind, i, float(h[i]), token, rank, sampled_prob, True))
            out += [Branch(answer, kind, i, float(h[i]), c, cand.index(c) + 1, probs[c], False) for c in alts]
    return out


def _seed(seed: int, answer: dict, b: Branch, k: int) -> int:
    key = f"{seed}:{answer['problem_id']}:{answer['sample']}:{b.position}:{b.candidate}:{k}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _key(answer: dict, b: Branch, k: int) -> tuple:
    return (answer["problem_id"], answer["sample"], b.kind, b.position, b.candidate, k)


def _done(out: Path) -> set[tuple]:
    if not out.exists():
        return set()
    text = out.read_text()
    if text and not text.endswith("\n"):  # a torn last line from an interrupted run
        text = text[: text.rfind("\n") + 1]
        out.write_text(text)
    return {(r["problem_id"], r["sample"], r["kind"], r["position"], r["candidate"], r["k"])
            for r in map(json.loads, text.splitlines())}


def _request(answer: dict, b: Branch, k: int, sampling: dict, config: ProbeConfig) -> Request:
    prefix = [*list(answer["completion_ids"][:b.position]), b.candidate]
    budget = int(sampling["max_new_tokens"]) - len(prefix)
    sp = SamplingParams(max_tokens=max(1, budget), temperature=sampling["temperature"], top_p=sampling["top_p"],
                        seed=_seed(config.seed, answer, b, k), stop=tuple(sampling.get("stop") or ()))
    return Request(list(answer["prompt_ids"]) + prefix, sp)


def run_probe(engine, answers: list[dict], points: list[Branch], sampling: dict, config: ProbeConfig,
              score: Callable[[str, str, bool], float], out: str | Path, progress: bool = True) -> int:
    """Continue every (point, candidate) `config.continuations` times; append records to `out`. Returns how
    many were added. `sampling`: the rollouts' meta sampling (temperature, top_p, max_new_tokens, stop)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    todo = [(b, k) for b in points for k in range(config.continuations) if _key(answers[b.answer], b, k) not in done]
    added = 0
    bar = tqdm(total=len(todo), desc="branches", unit="seq", disable=not progress)
    make = lambda item: _request(answers[item[0].answer], *item, sampling, config)  # noqa: E731
    with out.open("a") as f:
        for (b, k), _req, ids, last in decode_all(engine, todo, config.concurrency, make):
            f.write(json.dumps(_record(engine, answers[b.answer], b, k, ids, last.finish_reason, sampling, config,
                                       score)) + "\n")
            f.flush()
            added += 1
            bar.update(1)
    bar.close()
    return added


def _record(engine, answer: dict, b: Branch, k: int, ids: list[int], finish: str, sampling: dict,
            config: ProbeConfig, score) -> dict[str, Any]:
    completion = [*list(answer["completion_ids"][:b.position]), b.candidate, *ids]
    text = engine.tokenizer.decode(completion, skip_special_tokens=True)
    truncated = finish == "length"
    return {"problem_id": answer["problem_id"], "sample": answer["sample"], "row": answer.get("row"),
            "original_reward": answer["reward"], "kind": b.kind, "position": b.position, "entropy": b.entropy,
            "candidate": b.candidate, "rank": b.rank, "prob": b.prob, "sampled": b.sampled, "k": k,
            "seed": _seed(config.seed, answer, b, k), "continuation_ids": ids, "finish_reason": finish,
            "truncated": truncated, "reward": float(score(text, answer["gold"], truncated))}


def plan(model, records: Sequence[dict], config: ProbeConfig, wrong: int, right: int, per_problem: int,
         progress: bool = True) -> tuple[list[dict], list[Branch]]:
    """Pick the answers and score them teacher-forced under `model` (the base): (answers, branch points).
    Each answer's positions are drawn with its own `random.Random` keyed by (seed, problem, sample)."""
    answers = pick_answers(records, wrong, right, per_problem, config.seed)
    points: list[Branch] = []
    for a, r in enumerate(tqdm(answers, desc="scoring answers", unit="seq", disable=not progress)):
        scored = score_sequence(model, r["prompt_ids"], r["completion_ids"], top_k=config.alternatives + 1,
                                keep_hidden=False)
        rng = random.Random(f"{config.seed}:{r['problem_id']}:{r['sample']}")
        points += branch_points(scored, r["completion_ids"], a, config.tau, config.positions, config.alternatives, rng)
    return answers, points
