"""Where a decode step's time goes: torch.profiler over the engine's phases, per arm and concurrency.

    python bench/profile_decode.py [--model smollm2-135m-instruct] [--dtype DTYPE] [--streams 1,8,32]
                                   [--arms base,gated,lora-gated] [--new-tokens 64] [--compile] [--reference]
                                   [--module]
                                   [--json out.json]

For each concurrency S and arm, S chat prompts generate `--new-tokens` tokens each (greedy, EOS ignored)
once to warm up, then once under torch.profiler. The engine labels its phases (`engine.decode`: the
decoder forward; `engine.lm_head`; `engine.gate`: entropy and the gate; `engine.steer`: the correction;
`engine.sample`; `engine.record`: events, detokenising, stop checks; `engine.join`: prefill and merge;
`engine.evict`). It prints, per arm, ms per step and each phase's share of the wall time, the share spent
in aten kernels (self time of every op: the rest is Python, dispatch and the interpreter), and the ops
that take the most self time. Arms: `base` (no adapter), `gated` (a random rank-8 head adapter gated to
fire on ~3% of tokens), `lora-gated` and `lora-always` (bench/decode.py's random rank-16 LoRA on q/k/v/o,
gated at its own tau for ~3%).
"""

from __future__ import annotations

import argparse
import json
import time

from machine import describe, header
from torch.profiler import ProfilerActivity, profile

from reasonmaxxer.models import load_model
from reasonmaxxer.steering.allocator import tune_malloc
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams

try:
    from decode import bench_engine, calibrate, chat_prompts
except ImportError:  # run as `python -m bench.profile_decode`
    from bench.decode import bench_engine, calibrate, chat_prompts

PHASES = ["engine.decode", "engine.lm_head", "engine.gate", "engine.steer", "engine.sample", "engine.record",
          "engine.join", "engine.evict"]


def profile_arm(engine: Engine, prompts, new_tokens: int, steering: SteeringParams, top: int) -> dict:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([Request(p, sp, steering) for p in prompts])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        done = engine.generate([Request(p, sp, steering) for p in prompts])
        wall = time.perf_counter() - start
    events = prof.key_averages()
    phase = {e.key: e.cpu_time_total / 1e3 for e in events if e.key in PHASES}  # ms
    ops = sorted((e for e in events if not e.key.startswith("engine.") and e.self_cpu_time_total > 0),
                 key=lambda e: -e.self_cpu_time_total)
    kernels = sum(e.self_cpu_time_total for e in ops) / 1e3
    return {
        "wall_ms": wall * 1e3, "ms_per_step": wall * 1e3 / new_tokens,
        "tokens_per_s": len(prompts) * new_tokens / wall,
        "fire_rate": sum(c.report.gate_fired for c in done) / sum(c.report.tokens for c in done),
        "phases_ms": phase, "aten_self_ms": kernels,
        "top_ops": [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in ops[:top]],
    }


def print_arm(streams: int, arm: str, r: dict) -> None:
    wall = r["wall_ms"]
    print(f"\n== {streams} streams, {arm}: {r['ms_per_step']:.1f} ms/step, {r['tokens_per_s']:.1f} tok/s, "
          f"fired {r['fire_rate']:.1%}; "
          f"aten kernels {100 * r['aten_self_ms'] / wall:.0f}% of wall (the rest: Python and dispatch)")
    print("   " + "  ".join(f"{k.split('.')[1]} {100 * v / wall:.0f}%" for k, v in r["phases_ms"].items()))
    for name, ms, count in r["top_ops"]:
        print(f"   {name:<36} {100 * ms / wall:5.1f}%  {ms / count * 1e3:8.1f} us x {count}")


def main() -> None:
    tune_malloc()  # as the reasonmaxxer command does for its process (allocator.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default=None, help="default: models.preferred_dtype on this CPU")
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--arms", default="base,gated,lora-gated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top", type=int, default=8, help="how many ops to list per arm")
    parser.add_argument("--compile", action="store_true", help="decode steps through torch.compile")
    parser.add_argument("--reference", action="store_true", help="the engine's reference step")
    parser.add_argument("--module", action="store_true",
                        help="every fast path but the fused step: transformers' forward for prefill and decode")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    machine = describe()
    print(header(machine))
    print(f"model {args.model} in {str(model.dtype).removeprefix('torch.')}, {args.new_tokens} tokens per stream")
    arms = args.arms.split(",")
    step = "compiled" if args.compile else "reference" if args.reference else "module" if args.module else "fused"
    engine = bench_engine(model, tokenizer, args.model, lora=any(a.startswith("lora") for a in arms), step=step)
    d = model.config.hidden_size
    results = []
    for streams in [int(s) for s in args.streams.split(",")]:
        prompts = chat_prompts(tokenizer, streams)
        tau = calibrate(engine, prompts, args.new_tokens, 0.03) if "gated" in arms else 0.0
        tau_lora = (calibrate(engine, prompts, args.new_tokens, 0.03, adapter="bench-lora")
                    if "lora-gated" in arms else 0.0)  # its own tau, as in bench/decode.py
        steering = {"base": SteeringParams(), "gated": SteeringParams("bench-head", "gated", threshold=tau),
                    "lora-gated": SteeringParams("bench-lora", "gated", threshold=tau_lora),
                    "lora-always": SteeringParams("bench-lora", "always")}
        for arm in arms:
            r = profile_arm(engine, prompts, args.new_tokens, steering[arm], args.top)
            print_arm(streams, arm, r)
            results.append({"streams": streams, "arm": arm, "hidden": d, "dtype": str(model.dtype), "machine": machine,
                            **r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
