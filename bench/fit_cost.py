"""Fit cost: wall time and peak memory of each stage of a ReasonMaxxer fit, on this machine.

    python bench/fit_cost.py [--model smollm2-135m-instruct] [--problems ../shared/data/svamp/test.jsonl]
                             [--limit 16] [--samples 4] [--max-new-tokens 256] [--json out.json]

Stages, run one after another in this process: rollouts (engine, bf16, concurrency 32, real verifier),
teacher-forced scoring (bf16, hidden states kept), `head` fit (1 epoch, rank 32), `lora` fit (fp32, r 32,
q/k/v/o, 1 epoch, including its own scoring pass without hidden states). All rollouts are used, mixed or
not (the cost of a sequence does not depend on its advantage). Peak memory is the process's resident set
sampled every 20 ms during the stage; `delta` is that peak minus the resident set when the stage began.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from machine import describe, header

from reasonmaxxer.models import load_model
from reasonmaxxer.steering.allocator import tune_malloc
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.training.fit import FitArgs, fit_head, prepare_items
from reasonmaxxer.training.fit_lora import fit_lora
from reasonmaxxer.training.problems import load_problems
from reasonmaxxer.training.rollouts import RolloutConfig, load_rollouts, run_rollouts
from reasonmaxxer.training.verifier import Verifier

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def stage(results: dict, name: str, **extra):
    start_rss, peak, stop = rss_bytes(), [rss_bytes()], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    info: dict = {}
    yield info
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    results[name] = {"wall_s": wall, "peak_rss_gb": peak[0] / 2**30, "delta_gb": (peak[0] - start_rss) / 2**30,
                     **extra, **info}


def main() -> None:
    tune_malloc()  # as the reasonmaxxer command does for its process (allocator.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--problems", default=str(DATA / "svamp" / "test.jsonl"))
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    results: dict = {}
    problems = load_problems(args.problems, limit=args.limit)
    with stage(results, "load model (bf16)"):
        model, tok = load_model(args.model, dtype="bfloat16")
    tmp = Path(tempfile.mkdtemp())
    config = RolloutConfig(samples=args.samples, max_new_tokens=args.max_new_tokens)
    with stage(results, "rollouts") as info, Verifier() as verifier:
        summary = run_rollouts(Engine(model, tok, max_batch_size=32), problems, config, tmp / "r.jsonl", verifier.score)
        tokens = round(summary["mean_completion_tokens"] * summary["rollouts"])
        info.update(sequences=summary["rollouts"], tokens=tokens)
    _, records = load_rollouts(tmp / "r.jsonl")
    head_args = FitArgs(kind="head", rank=32, lr=3e-4, epochs=1)
    with stage(results, "scoring (head)") as info:
        items, tau, _ = prepare_items(model, records, head_args)
        info.update(sequences=len(items), positions=sum(it.scored.entropy.numel() for it in items))
    with stage(results, "head fit") as info:
        _, history, _ = fit_head(model, tok, items, tau, head_args, None)
        info.update(steps=len(history))
    del items, model
    lora_args = FitArgs(kind="lora", rank=32, lora_alpha=64, lr=1e-4, epochs=1)
    with stage(results, "lora fit (incl. scoring, fp32)") as info:
        model32, _ = load_model(args.model, dtype="float32")
        lora_items, tau, _ = prepare_items(model32, records, lora_args)
        _, history, _ = fit_lora(model32, tok, lora_items, tau, lora_args, None)
        info.update(steps=len(history), sequences=len(lora_items))

    machine = describe()
    print(f"\n{header(machine)}")
    print(f"{args.model} on this machine: {len(problems)} problems x {args.samples} samples, "
          f"max {args.max_new_tokens} new tokens ({summary['rollouts']} rollouts, pass@1 {summary['pass@1']:.3f}, "
          f"{summary['mixed_problems']} mixed problems)")
    print(f"{'stage':32} {'wall s':>8} {'peak RSS GB':>12} {'delta GB':>9}  detail")
    for name, r in results.items():
        detail = {k: v for k, v in r.items() if k not in ("wall_s", "peak_rss_gb", "delta_gb")}
        print(f"{name:32} {r['wall_s']:>8.1f} {r['peak_rss_gb']:>12.2f} {r['delta_gb']:>9.2f}  {detail}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "summary": summary,
                                               "stages": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
