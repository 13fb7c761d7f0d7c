"""What a teacher costs, side by side in one run: the base alone, the base with a gated teacher, the teacher alone.

    python bench/teacher.py [--model smollm2-135m-instruct] [--teacher smollm2-135m-instruct] [--streams 1,8]
                            [--new-tokens 128] [--repeats 3] [--fire-rate 0.03] [--dtype bfloat16] [--json out.json]

For each concurrency S, S chat-templated math prompts each generate exactly `--new-tokens` tokens (greedy,
EOS ignored) with:
- `base`: our engine on `--model`, no correction;
- `gated`: the same engine with `--teacher` registered as a teacher, gated at the base-entropy quantile
  that fires on about `--fire-rate` of a base run's tokens (the measured rate is printed: firing changes
  the text, so it drifts);
- `per-row`: `gated` with each fired row's teacher prefill in its own forward (the path before
  `teacher.next_logits` batched a step's fired rows): `gated/per-row` is what the batching buys;
- `teacher`: our engine on the teacher model alone (what a cascade saves against).
The arms run interleaved `--repeats` times, their order rotating; tokens/s comes from the median wall time
and each ratio is the median of the per-repeat ratios (pairing cancels this VM's drift). Also printed: the
tokens the teacher processed per generated token in `gated` (its lazy prefills). With the same model as its
own teacher (the quick run) the gated tokens equal the base's; the Qwen pair is the figure:
`--model qwen2.5-coder-0.5b-instruct --teacher qwen2.5-coder-1.5b-instruct`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from decode import chat_prompts
from machine import describe, header

from reasonmaxxer.models import load_model
from reasonmaxxer.steering import corrections
from reasonmaxxer.steering.allocator import tune_malloc
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams
from reasonmaxxer.steering.teacher import Teacher


def per_row(cursors, texts):
    """The teacher prefills one forward per fired row (what `teacher.next_logits` batches)."""
    return [c.logits(t) for c, t in zip(cursors, texts, strict=True)]


def run(engine: Engine, prompts, new_tokens: int, steering: SteeringParams, one_by_one: bool = False) -> tuple:
    batched = corrections.next_logits
    corrections.next_logits = per_row if one_by_one else batched
    try:
        return _run(engine, prompts, new_tokens, steering)
    finally:
        corrections.next_logits = batched


def _run(engine: Engine, prompts, new_tokens: int, steering: SteeringParams) -> tuple[float, list]:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    done = engine.generate([Request(p, sp, steering) for p in prompts])
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == new_tokens for c in done)
    return elapsed, [c.report for c in done]


def quantile_tau(engine: Engine, prompts, new_tokens: int, fire_rate: float) -> float:
    """The base-entropy quantile that a base run exceeds on `fire_rate` of its tokens."""
    _, reports = _run(engine, prompts, new_tokens, SteeringParams("bench-teacher", "gated", float("inf"), trace=True))
    h = torch.tensor([t.entropy for r in reports for t in r.trace])
    return float(h.quantile(1.0 - fire_rate))



def measure(base: Engine, alone: Engine, streams: int, args) -> dict:
    prompts = chat_prompts(base.tokenizer, streams)
    tau = quantile_tau(base, prompts, args.new_tokens, args.fire_rate)
    gated = SteeringParams("bench-teacher", "gated", tau)
    arms = {"base": lambda: run(base, prompts, args.new_tokens, SteeringParams()),
            "gated": lambda: run(base, prompts, args.new_tokens, gated),
            "per-row": lambda: run(base, prompts, args.new_tokens, gated, one_by_one=True),
            "teacher": lambda: run(alone, prompts, args.new_tokens, SteeringParams())}
    for arm in arms.values():  # warm-up
        arm()
    times: dict[str, list[float]] = {k: [] for k in arms}
    fired, teacher_tokens = [], []
    names = list(arms)
    for i in range(args.repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t, reports = arms[name]()
            times[name].append(t)
            if name == "gated":
                tokens = sum(r.tokens for r in reports)
                fired.append(sum(r.gate_fired for r in reports) / tokens)
                teacher_tokens.append(sum(r.teacher_tokens for r in reports) / tokens)
    tps = {k: streams * args.new_tokens / statistics.median(v) for k, v in times.items()}
    paired = lambda a, b: statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))  # noqa: E731
    return {"streams": streams, "tau": tau, "tokens_per_s": tps, "fire_rate": statistics.mean(fired),
            "teacher_tokens_per_token": statistics.mean(teacher_tokens),
            "gated_over_base": paired("gated", "base"), "teacher_over_base": paired("teacher", "base"),
            "gated_over_teacher": paired("gated", "teacher"), "gated_over_per_row": paired("gated", "per-row"),
            "wall_s": times}


def main() -> None:
    tune_malloc()  # as the reasonmaxxer command does for its process (allocator.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the base model (known name or folder)")
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="the teacher (same tokenizer)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", default="1,8", help="concurrencies, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fire-rate", type=float, default=0.03, help="the gate's target share of base tokens")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    t_model, t_tokenizer = load_model(args.teacher, dtype=args.dtype, device=args.device)
    base = Engine(model, tokenizer, max_batch_size=64, name=args.model)
    base.add_adapter(Teacher.create(t_model, t_tokenizer, "bench-teacher"))
    alone = Engine(t_model, t_tokenizer, max_batch_size=64, name=args.teacher)
    machine = describe()
    print(header(machine), flush=True)
    results = [measure(base, alone, int(s), args) for s in args.streams.split(",")]

    print(f"\n{header(machine)}")
    print(f"base {args.model}, teacher {args.teacher} ({args.dtype}, {args.device}), {args.new_tokens} new "
          f"tokens/stream, median of {args.repeats}")
    print(f"{'streams':>7} {'base':>8} {'gated':>8} {'per-row':>8} {'teacher':>8} {'fire':>6} {'t-tok/tok':>9} "
          f"{'gated/base':>10} {'teacher/base':>12} {'gated/teacher':>13} {'gated/per-row':>13}")
    for r in results:
        t = r["tokens_per_s"]
        print(f"{r['streams']:>7} {t['base']:>8.1f} {t['gated']:>8.1f} {t['per-row']:>8.1f} {t['teacher']:>8.1f} "
              f"{r['fire_rate']:>6.3f} {r['teacher_tokens_per_token']:>9.2f} {r['gated_over_base']:>10.3f} "
              f"{r['teacher_over_base']:>12.3f} {r['gated_over_teacher']:>13.3f} {r['gated_over_per_row']:>13.3f}")
    if args.json:
        payload = {"machine": machine, "model": args.model, "teacher": args.teacher, "dtype": args.dtype,
                   "device": args.device, "fire_target": args.fire_rate, "new_tokens": args.new_tokens,
                   "repeats": args.repeats, "results": results}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
