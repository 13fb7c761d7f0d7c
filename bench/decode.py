"""Decode throughput, side by side in one run: our engine (base, gated head) vs transformers `generate`.

    python bench/decode.py [--model smollm2-135m-instruct] [--dtype bfloat16] [--streams 1,8]
                           [--new-tokens 128] [--repeats 3] [--fire-rate 0.03] [--json out.json]

For each concurrency S, S chat-templated math prompts each generate exactly `--new-tokens` tokens
(greedy, EOS ignored) with:
- `engine-base`: our engine, no adapter;
- `engine-gated`: our engine, a random `head` adapter (rank 8) gated at the entropy quantile that makes
  it fire on about `--fire-rate` of tokens (calibrated on runs of the same S prompts);
- `hf-generate`: `model.generate` on the same S prompts as one left-padded batch.
The three run interleaved `--repeats` times (their order rotating), so that each repeat compares them
within seconds of each other; tokens/s is from the median wall time and each ratio is the median of the
per-repeat ratios (this 2-core VM drifts by +-15% between runs, which pairing cancels). It prints the
table and the ratios gated/base and engine/generate, and writes them as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.models import load_model
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. She has only half of the money she needs. "
    "How much more money does Betty need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Tom has 5 apples and buys 7 more, then gives away 3. How many apples does he have?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "If 3x + 5 = 20, what is x?",
]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + " Put the answer in \\boxed{}."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append(list(ids))
    return out


def calibrate(engine: Engine, prompts, new_tokens: int, fire_rate: float, rounds: int = 6) -> float:
    """A tau at which the gated run itself fires on about `fire_rate` of its tokens.

    Firing changes the text and so the later entropies, so a quantile of a base run is only the start:
    bisect on the quantile level, measuring the gated run's own fire rate, and keep the closest tau.
    """
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def gated_run(tau: float) -> tuple[float, torch.Tensor]:
        steering = SteeringParams(adapter="bench-head", mode="gated", threshold=tau, trace=True)
        done = engine.generate([Request(p, sp, steering) for p in prompts])
        trace = [t for c in done for t in c.report.trace]
        return sum(t.fired for t in trace) / len(trace), torch.tensor([t.entropy for t in trace])

    _, base_entropies = gated_run(float("inf"))
    lo, hi, best = 0.0, min(1.0, 4 * fire_rate), (float("inf"), float("inf"))
    level = fire_rate
    for _ in range(rounds):
        tau = float(base_entropies.quantile(1.0 - level))
        rate, _ = gated_run(tau)
        best = min(best, (abs(rate - fire_rate), tau))
        lo, hi = (level, hi) if rate < fire_rate else (lo, level)
        level = (lo + hi) / 2
    return best[1]


def run_engine(engine: Engine, prompts, new_tokens: int, steering: SteeringParams) -> tuple[float, float]:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = engine.generate([Request(p, sp, steering) for p in prompts])
    elapsed = time.perf_counter() - start
    assert all(len(r.token_ids) == new_tokens for r in results)
    fired = sum(r.report.gate_fired for r in results) / sum(r.report.tokens for r in results)
    return elapsed, fired


@torch.inference_mode()
def run_generate(model, tokenizer, prompts, new_tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    start = time.perf_counter()
    out = model.generate(
        **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    elapsed = time.perf_counter() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return elapsed


def measure(model, tokenizer, engine, streams: int, args) -> dict:
    """Interleaved repeats (the order rotates each repeat); ratios are medians of per-repeat ratios."""
    prompts = chat_prompts(tokenizer, streams)
    tau = calibrate(engine, prompts, args.new_tokens, args.fire_rate)
    off, gated = SteeringParams(), SteeringParams(adapter="bench-head", mode="gated", threshold=tau)
    arms = {
        "engine-base": lambda: run_engine(engine, prompts, args.new_tokens, off),
        "engine-gated": lambda: run_engine(engine, prompts, args.new_tokens, gated),
        "hf-generate": lambda: (run_generate(model, tokenizer, prompts, args.new_tokens), None),
    }
    run_engine(engine, prompts, 8, off)  # warm-up
    run_generate(model, tokenizer, prompts, 8)
    times: dict[str, list[float]] = {k: [] for k in arms}
    fire = []
    names = list(arms)
    for i in range(args.repeats):
        for name in names[i % 3:] + names[: i % 3]:
            t, f = arms[name]()
            times[name].append(t)
            if f is not None and name == "engine-gated":
                fire.append(f)
    tps = {k: streams * args.new_tokens / statistics.median(v) for k, v in times.items()}
    paired = lambda a, b: statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))  # noqa: E731
    return {
        "streams": streams, "tau": tau, "tokens_per_s": tps, "fire_rate": statistics.mean(fire),
        "gated_over_base": paired("engine-gated", "engine-base"),
        "engine_over_generate": paired("engine-base", "hf-generate"),
        "wall_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--fire-rate", type=float, default=0.03)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(model, tokenizer, max_batch_size=64, name=args.model)
    engine.add_adapter(HeadAdapter.create(model, tokenizer, "bench-head", rank=8, b_std=0.5, seed=0))
    rows = [measure(model, tokenizer, engine, int(s), args) for s in args.streams.split(",")]

    print(f"\nmodel {args.model} ({args.dtype}, {args.device}, {torch.get_num_threads()} threads), "
          f"{args.new_tokens} new tokens/stream, median of {args.repeats}; tau calibrated per row for "
          f"{args.fire_rate:.0%} of base tokens")
    print(f"{'streams':>7} {'engine-base':>12} {'engine-gated':>13} {'hf-generate':>12} {'fire':>6} "
          f"{'gated/base':>11} {'engine/gen':>11}")
    for r in rows:
        t = r["tokens_per_s"]
        print(f"{r['streams']:>7} {t['engine-base']:>12.1f} {t['engine-gated']:>13.1f} {t['hf-generate']:>12.1f} "
              f"{r['fire_rate']:>6.3f} {r['gated_over_base']:>11.3f} {r['engine_over_generate']:>11.3f}")
    if args.json:
        payload = {"model": args.model, "dtype": args.dtype, "device": args.device, "fire_target": args.fire_rate,
                   "new_tokens": args.new_tokens, "repeats": args.repeats, "results": rows}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
