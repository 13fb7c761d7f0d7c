"""Prompt logprobs (`echo`), checked against transformers forwards computed by hand: the base, a `head`
adapter applied at every position, gated at +inf (the base again), PEFT's LoRA model, gated LoRA's
per-position recompute, and the random control's coins. Float tolerance: 1e-4 in fp32 (the engine and
the reference run the same weights through differently shaped matmuls)."""

import copy

import pytest
import torch

from reasonmaxxer.steering.adapters import HeadAdapter, load_adapter
from reasonmaxxer.steering.batch import cache_kwarg
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.gate import entropy, random_fire
from reasonmaxxer.steering.request import SteeringParams

ATOL = 1e-4
TEXT = "Natalia sold clips to 48 of her friends in April, and then she sold half"


@pytest.fixture(scope="module")
def setup(tiny_model, tokenizer, lora_setup):
    directory, peft_model = lora_setup
    engine = Engine(tiny_model, tokenizer, name="tiny")
    head = HeadAdapter.create(tiny_model, tokenizer, "head", rank=8, tau=3.0, b_std=2.0, seed=1)
    engine.add_adapter(head)
    engine.add_adapter(load_adapter(directory))
    ids = tokenizer(TEXT)["input_ids"]
    return engine, head, peft_model, ids


def _logp(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(n, V) logits at positions 0..n-1 -> logprob of token j+1 at row j. -> (n-1,)"""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def _reference(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0].float(), out.hidden_states[-1][0]


def _scores(engine, ids, top_n=3, source="steered", key=0, **steering):
    return engine.prompt_logprobs([ids], SteeringParams(**steering, logprobs=source), top_n, key)[0]


def test_base_equals_a_full_forward_token_for_token(setup, tiny_model):
    engine, _, _, ids = setup
    got = _scores(engine, ids)
    logits, _ = _reference(tiny_model, ids)
    assert got.logprobs[0] is None and got.top[0] is None and len(got.logprobs) == len(ids)
    torch.testing.assert_close(torch.tensor(got.logprobs[1:]), _logp(logits, ids), atol=ATOL, rtol=0)
    best = torch.log_softmax(logits, -1)[:-1].topk(3, dim=-1)
    assert [[t for t, _ in top] for top in got.top[1:]] == best.indices.tolist()
    assert got.fired == 0 and got.scored == len(ids) - 1


def test_head_always_equals_the_correction_applied_by_hand(setup, tiny_model):
    engine, head, _, ids = setup
    logits, hidden = _reference(tiny_model, ids)
    cand = logits.topk(head.manifest.top_k, dim=-1).indices  # (n, k)
    delta = head.delta(hidden, cand, tiny_model.get_output_embeddings().weight)
    steered = logits.scatter_add(1, cand, delta)
    got = _scores(engine, ids, adapter="head", mode="always")
    torch.testing.assert_close(torch.tensor(got.logprobs[1:]), _logp(steered, ids), atol=ATOL, rtol=0)
    assert got.fired == len(ids) - 1
    assert not torch.allclose(_logp(steered, ids), _logp(logits, ids), atol=1e-2)  # the correction is not a no-op
    base = _scores(engine, ids, source="base", adapter="head", mode="always")  # steering.logprobs: "base"
    torch.testing.assert_close(torch.tensor(base.logprobs[1:]), _logp(logits, ids), atol=ATOL, rtol=0)


def test_head_gated_fires_where_the_base_entropy_passes_and_inf_gives_the_base(setup, tiny_model):
    engine, head, _, ids = setup
    logits, hidden = _reference(tiny_model, ids)
    off = _scores(engine, ids, adapter="head", mode="gated", threshold=float("inf"))
    torch.testing.assert_close(torch.tensor(off.logprobs[1:]), _logp(logits, ids), atol=ATOL, rtol=0)
    assert off.fired == 0
    h = entropy(logits[:-1])
    tau = float(h.median())
    fired = h > tau
    cand = logits.topk(head.manifest.top_k, dim=-1).indices
    delta = head.delta(hidden, cand, tiny_model.get_output_embeddings().weight)
    steered = torch.where(torch.tensor([*fired.tolist(), False])[:, None], logits.scatter_add(1, cand, delta), logits)
    got = _scores(engine, ids, adapter="head", mode="gated", threshold=tau)
    assert got.fired == int(fired.sum()) > 0
    torch.testing.assert_close(torch.tensor(got.logprobs[1:]), _logp(steered, ids), atol=ATOL, rtol=0)


def test_lora_always_equals_peft_and_gated_recomputes_each_fired_position(setup, tiny_model):
    engine, _, peft_model, ids = setup
    name = next(n for n, a in engine.adapters.items() if a.manifest.kind == "lora")
    adapted, _ = _reference(peft_model, ids)
    got = _scores(engine, ids, adapter=name, mode="always")
    torch.testing.assert_close(torch.tensor(got.logprobs[1:]), _logp(adapted, ids), atol=ATOL, rtol=0)
    base, _ = _reference(tiny_model, ids)
    off = _scores(engine, ids, adapter=name, mode="gated", threshold=float("inf"))
    torch.testing.assert_close(torch.tensor(off.logprobs[1:]), _logp(base, ids), atol=ATOL, rtol=0)
    # threshold 0 fires everywhere: each position is the LoRA model's one-token step over the base cache
    every = _scores(engine, ids, adapter=name, mode="gated", threshold=0.0)
    rows = []
    with torch.no_grad():
        for col in range(len(ids)):
            prefix = tiny_model(torch.tensor([ids[:col]]), use_cache=True).past_key_values if col else None
            out = peft_model(torch.tensor([[ids[col]]]), position_ids=torch.tensor([[col]]), use_cache=True,
                             **{cache_kwarg(tiny_model): copy.deepcopy(prefix)})
            rows.append(out.logits[0, -1].float())
    recomputed = torch.stack(rows)
    torch.testing.assert_close(torch.tensor(every.logprobs[1:]), _logp(recomputed, ids), atol=ATOL, rtol=0)
    assert every.fired == len(ids) - 1
    assert not torch.allclose(_logp(recomputed, ids), _logp(adapted, ids), atol=1e-3)  # not the adapted prefix


def test_random_control_fires_by_its_coins_on_negative_positions(setup, tiny_model):
    engine, head, _, ids = setup
    got = _scores(engine, ids, key=7, adapter="head", mode="random", rate=0.5)
    coins = [random_fire(7, -j, 0.5) for j in range(1, len(ids))]
    assert got.fired == sum(coins) > 0
    logits, hidden = _reference(tiny_model, ids)
    cand = logits.topk(head.manifest.top_k, dim=-1).indices
    delta = head.delta(hidden, cand, tiny_model.get_output_embeddings().weight)
    steered = torch.where(torch.tensor([*coins, False])[:, None], logits.scatter_add(1, cand, delta), logits)
    torch.testing.assert_close(torch.tensor(got.logprobs[1:]), _logp(steered, ids), atol=ATOL, rtol=0)


def test_a_one_token_prompt_and_long_prompts_in_chunks(setup, tiny_model, monkeypatch):
    engine, _, _, ids = setup
    one = _scores(engine, ids[:1])
    assert one.logprobs == [None] and one.top == [None] and one.scored == 0
    from reasonmaxxer.steering import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "CHUNK", 5)  # several chunks: the same numbers
    chunked = _scores(engine, ids, adapter="head", mode="always")
    monkeypatch.setattr(prompt_logprobs, "CHUNK", 256)
    whole = _scores(engine, ids, adapter="head", mode="always")
    torch.testing.assert_close(torch.tensor(chunked.logprobs[1:]), torch.tensor(whole.logprobs[1:]), atol=ATOL,
                               rtol=0)


@pytest.mark.parametrize("steering", [{}, {"adapter": "head", "mode": "gated", "threshold": 0.0},
                                      {"adapter": "lora", "mode": "always"}, {"adapter": "lora", "mode": "gated",
                                                                              "threshold": 0.0},
                                      {"adapter": "head", "mode": "random", "rate": 0.5}])
def test_prefilled_in_chunks_the_scores_are_the_whole_prompts(setup, monkeypatch, steering):
    """A server scores a long prompt a chunk at a time (prefill over the cache of the chunks before, then the
    chunk's scores): the same numbers as one prefill, for every kind of steering."""
    engine, _, _, ids = setup
    if steering.get("adapter") == "lora":
        steering = {**steering, "adapter": next(n for n, a in engine.adapters.items() if a.manifest.kind == "lora")}
    from reasonmaxxer.steering import prompt_logprobs

    whole = _scores(engine, ids, **steering)
    monkeypatch.setattr(prompt_logprobs, "CHUNK", 4)
    pieces = engine.prompt_logprobs_pieces([ids], SteeringParams(**steering), 3, 0)
    turns = 0
    try:
        while True:
            next(pieces)
            turns += 1
    except StopIteration as done:
        chunked = done.value[0]
    assert turns == (len(ids) - 1) // 4  # a piece per chunk of 4 positions, the last one returns
    torch.testing.assert_close(torch.tensor(chunked.logprobs[1:]), torch.tensor(whole.logprobs[1:]), atol=ATOL,
                               rtol=0)
    assert chunked.fired == whole.fired and [[t for t, _ in top] for top in chunked.top[1:]] == \
        [[t for t, _ in top] for top in whole.top[1:]]


def test_unknown_adapter_and_empty_prompt_are_refused(setup):
    engine, _, _, ids = setup
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.prompt_logprobs([ids], SteeringParams(adapter="nope", mode="always"))
    with pytest.raises(ValueError, match="empty"):
        engine.prompt_logprobs([[]], SteeringParams())
