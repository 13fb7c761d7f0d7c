"""End to end on the real SmolLM2-135M-Instruct, prepared by `prepare-model` (from PyPI on a fresh machine)."""

import math

import pytest

from reasonmaxxer.models import load_model
from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams

from conftest import assert_greedy_matches

QUESTIONS = ["What is 12 * 7? Put the answer in \\boxed{}.", "Tom has 5 apples and buys 7 more. How many now?"]
N = 32


@pytest.fixture(scope="module")
def smol():
    model, tok = load_model("smollm2-135m-instruct", dtype="bfloat16")
    engine = Engine(model, tok, name="smollm2-135m-instruct")
    engine.add_adapter(HeadAdapter.create(model, tok, "rand-head", rank=8, tau=1.0, b_std=0.5, seed=0))
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False))
        for q in QUESTIONS
    ]
    return model, tok, engine, prompts


def test_engine_greedy_equals_transformers_generate(smol):
    """The fixture built the engine before this reference runs, on the same model object: the engine must have
    left it as it was (own.py), so `generate` is transformers' own. Equal until the first near-tie, where bf16
    kernels that differ by ISA (AVX2, AVX-512, AMX) may choose the other token (conftest)."""
    model, tok, engine, prompts = smol
    for prompt in prompts:
        ours = engine.generate([Request(prompt, SamplingParams(max_tokens=N, temperature=0.0))])[0]
        same = assert_greedy_matches(ours.token_ids, model, prompt, N)
        assert same > 0 and ours.text == tok.decode(ours.token_ids, skip_special_tokens=True)


def test_gated_head_on_smollm2(smol):
    _, _, engine, prompts = smol
    sp = SamplingParams(max_tokens=N, temperature=0.6, top_p=0.95, seed=7)
    base = engine.generate([Request(prompts[0], sp)])[0]
    never = engine.generate([Request(prompts[0], sp, SteeringParams("rand-head", "gated", math.inf))])[0]
    assert never.token_ids == base.token_ids
    out = engine.generate([Request(p, sp, SteeringParams("rand-head", "gated", trace=True)) for p in prompts])
    for c in out:
        trace = c.report.trace
        assert c.report.gate_fired == sum(t.entropy > 1.0 for t in trace) == sum(t.fired for t in trace)
        assert c.report.tokens == len(c.token_ids) and 0.0 <= c.report.fire_rate <= 1.0
        assert c.text.strip()
