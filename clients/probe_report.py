"""The branch probe's summary: do decision points matter more than random positions?

Contract: `summarize(records)` takes the records `training/probe.py` writes (one per continuation) and
returns, per kind of point (decision, random):
- `entropy_mean` (base entropy at the points) and `alt_prob_mean` (base probability of the forced
  alternatives): how large a perturbation forcing an alternative is at each kind of point;
- `fix_alt` / `fix_resample`: among originally wrong answers, the share of continuations that end right
  after forcing a base alternative / after re-sampling from the sampled token itself (the control that
  changes nothing but the randomness of the rest);
- `break_alt` / `break_resample`: among originally right answers, the share that end wrong;
- `answers_fixed`: the share of wrong answers with at least one right continuation from an alternative;
- `best_alt_beats_sampled`: over points, how often the best alternative's mean reward is above the sampled
  token's (also `ties`, `worse`); `oracle_gain`: the mean over points of max(best alternative, sampled)
  minus sampled: what a correction that always picked the better candidate at one point could gain (an
  upper bound: the maximum over few noisy samples is biased upwards);
each with a 95% interval from resampling problems (the continuations of one point, the points of one answer
and the answers of one problem are correlated); and the paired difference decision - random of `fix_alt`
and `break_alt`, paired by answer, resampling problems.
`markdown(summary)` renders the tables; `write_summary(branches.jsonl)` writes summary.json and summary.md
beside the records and prints the tables (also `reasonmaxxer probe-report DIR` for a run in progress).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import bootstrap_mean, paired_bootstrap

__all__ = ["markdown", "summarize", "write_summary"]

KINDS = ("decision", "random")


def _mean_ci(values: list[float], groups: list[str]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "ci95": None, "n": 0}
    mean, (lo, hi) = bootstrap_mean(values, groups)
    return {"mean": mean, "ci95": [lo, hi], "n": len(values)}


def _answer(r: dict) -> str:
    return f"{r['problem_id']}#{r['sample']}"


def _points(rows: Sequence[dict]) -> dict[tuple, dict[str, list[float]]]:
    """(answer, position) -> {"sampled": rewards, candidate id: rewards, ...}."""
    out: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[(_answer(r), r["position"])]["sampled" if r["sampled"] else str(r["candidate"])].append(r["reward"])
    return out


def _point_stats(rows: Sequence[dict]) -> dict[str, Any]:
    wins, values, groups = [], [], []
    for (answer, _), cands in _points(rows).items():
        sampled = cands.get("sampled")
        alts = [sum(v) / len(v) for k, v in cands.items() if k != "sampled"]
        if not sampled or not alts:
            continue
        s, best = sum(sampled) / len(sampled), max(alts)
        wins.append((best > s) - (best < s))
        values.append(max(best, s) - s)
        groups.append(answer.rsplit("#", 1)[0])
    n = max(1, len(wins))
    return {"points": len(wins), "best_alt_beats_sampled": sum(w > 0 for w in wins) / n,
            "ties": sum(w == 0 for w in wins) / n, "worse": sum(w < 0 for w in wins) / n,
            "oracle_gain": _mean_ci(values, groups)}


def _kind_stats(rows: Sequence[dict]) -> dict[str, Any]:
    def share(original: float, sampled: bool, flip: bool) -> dict[str, Any]:
        sel = [r for r in rows if r["original_reward"] == original and r["sampled"] == sampled]
        return _mean_ci([1.0 - r["reward"] if flip else r["reward"] for r in sel], [str(r["problem_id"]) for r in sel])

    wrong = defaultdict(list)
    for r in rows:
        if r["original_reward"] == 0.0 and not r["sampled"]:
            wrong[_answer(r)].append(r["reward"])
    alts = [r for r in rows if not r["sampled"] and r.get("k", 0) == 0]
    points = {(_answer(r), r["position"]): r.get("entropy", 0.0) for r in rows}
    return {"answers": len({_answer(r) for r in rows}),
            "entropy_mean": sum(points.values()) / max(1, len(points)),
            "alt_prob_mean": sum(r.get("prob", 0.0) for r in alts) / max(1, len(alts)),
            "fix_alt": share(0.0, False, False), "fix_resample": share(0.0, True, False),
            "break_alt": share(1.0, False, True), "break_resample": share(1.0, True, True),
            "answers_fixed": sum(max(v) > 0 for v in wrong.values()) / max(1, len(wrong)),
            **_point_stats(rows)}


def _paired(rows: Sequence[dict], original: float, flip: bool) -> dict[str, Any] | None:
    """decision - random of the per-answer alternative outcome share, paired by answer."""
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["original_reward"] == original and not r["sampled"]:
            per[_answer(r)][r["kind"]].append(1.0 - r["reward"] if flip else r["reward"])
    both = [a for a, v in per.items() if v["decision"] and v["random"]]
    if not both:
        return None
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    a = [mean(per[x]["random"]) for x in both]
    b = [mean(per[x]["decision"]) for x in both]
    diff, (lo, hi) = paired_bootstrap(a, b, [x.rsplit("#", 1)[0] for x in both])
    return {"answers": len(both), "diff": diff, "ci95": [lo, hi]}


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"continuations": len(records),
                           "kinds": {k: _kind_stats([r for r in records if r["kind"] == k]) for k in KINDS}}
    out["decision_minus_random"] = {"fix_alt": _paired(records, 0.0, False), "break_alt": _paired(records, 1.0, True)}
    return out


def _fmt(x: dict[str, Any] | None) -> str:
    if not x or x.get("mean") is None:
        return "-"
    return f"{x['mean']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}] (n {x['n']})"


def markdown(summary: dict[str, Any]) -> str:
    header = ["points", "answers", "mean H", "mean base p of the alternatives", "wrong fixed: alternative",
              "wrong fixed: resample", "right broken: alternative", "right broken: resample",
              "wrong answers fixed by some alternative", "best alt > sampled (ties, worse)", "oracle gain per point"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---|---|---|---|---:|---|---|"]
    for kind in KINDS:
        k = summary["kinds"][kind]
        cells = [kind, str(k["answers"]), f"{k['entropy_mean']:.2f}", f"{k['alt_prob_mean']:.3f}",
                 *(_fmt(k[x]) for x in ("fix_alt", "fix_resample", "break_alt", "break_resample")),
                 f"{k['answers_fixed']:.3f}",
                 f"{k['best_alt_beats_sampled']:.3f} ({k['ties']:.3f}, {k['worse']:.3f}) of {k['points']}",
                 _fmt(k["oracle_gain"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, d in summary["decision_minus_random"].items():
        if d:
            lines.append(f"decision - random, {name}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
                         f"over {d['answers']} answers (paired by answer, resampling problems)")
    return "\n".join(lines) + "\n"


def write_summary(branches: str | Path) -> dict[str, Any]:
    """Summarise a probe's branches.jsonl: summary.json and summary.md beside it; print the tables."""
    path = Path(branches)
    text = path.read_text() if path.exists() else ""
    records = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
    if not records:
        raise ValueError(f"{path} holds no branch records yet: run `reasonmaxxer probe-branches` first")
    summary = summarize(records)
    (path.parent / "summary.json").write_text(json.dumps(summary, indent=2))
    (path.parent / "summary.md").write_text(markdown(summary))
    print(markdown(summary), end="")
    print(f"wrote {path.parent / 'summary.json'} and {path.parent / 'summary.md'}")
    return summary
