"""`reasonmaxxer ab-report`: rewrite ab.json and report.html from an ab folder's samples (no server).

Contract: `add_arguments(parser)` adds the flags; `main(args)` reports the samples of an `ab --out` folder (of
an interrupted run too: only the (problem, sample) pairs every arm has, saying how many were left out), on all
its arms or the ones `--arms` names, and prints the per-arm table (text, `--markdown` or `--json`); with
`--reference ARM` it writes nothing and prints every other arm paired against ARM instead of base. A folder
that is not an ab folder, holds no samples or lacks an arm is a FileNotFoundError / ValueError saying so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import ab
from .ab_cli import write_report
from .report import reference_table

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("out", help="an `ab --out` folder; an interrupted run is reported on the samples it has")
    p.add_argument("--markdown", action="store_true", help="print the per-arm table as Markdown")
    p.add_argument("--json", action="store_true", help="print the per-arm summary as JSON")
    p.add_argument("--arms", default=None, metavar="LIST",
                   help="report only these arms (names as in the folder), e.g. base,X:gated (default: all)")
    p.add_argument("--reference", default=None, metavar="ARM",
                   help="instead of the report, pair every other arm against this one (e.g. a random-position "
                        "arm) and print the paired differences, McNemar p and discordant pairs; writes nothing "
                        "(default: none: the report, against base)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    meta_path, samples = out / "meta.json", out / "samples.jsonl"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: give the --out folder of a `reasonmaxxer ab` run")
    meta = json.loads(meta_path.read_text())
    records = ab.load_samples(out)
    if not records:
        raise ValueError(f"{samples} holds no samples yet: run `reasonmaxxer ab` first")
    arms = [ab.Arm(**a) for a in meta["arms"]]
    if args.arms:
        wanted = [x.strip() for x in args.arms.split(",") if x.strip()]
        unknown = sorted(set(wanted) - {a.name for a in arms})
        if unknown:
            raise ValueError(f"{out} has no arm(s) {unknown}; it has {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in wanted]
        records = [r for r in records if r["arm"] in wanted]
    keys = [{(r["problem_id"], r["sample"]) for r in records if r["arm"] == a.name} for a in arms]
    complete = set.intersection(*keys)  # an interrupted run: report only the samples every arm has
    kept = [r for r in records if (r["problem_id"], r["sample"]) in complete]
    if len(kept) < len(records):
        print(f"{len(records) - len(kept)} samples left out: not every arm has them "
              "(an interrupted run, or arms sampled on fewer problems)")
    if not kept:
        raise ValueError(f"no (problem, sample) in {samples} has been answered by every arm yet")
    records = kept
    if args.reference:
        print(reference_table(ab.against(records, args.reference), args.reference, args.markdown), end="")
        return 0
    style = "markdown" if args.markdown else "json" if args.json else "text"
    write_report(records, arms, meta["model"], meta["problems"], out, style)
    return 0

