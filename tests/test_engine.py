"""The transformers decode engine: gate identities, adapters against references, batching, control."""

import copy
import math

import pytest
import torch
from transformers import DynamicCache

from reasonmaxxer.steering.adapters import HeadAdapter, load_adapter
from reasonmaxxer.steering.batch import cache_kwarg
from reasonmaxxer.steering.engine import STEPS, Engine
from reasonmaxxer.steering.gate import entropy
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams

N = 24  # tokens per request


def greedy(**kw):
    return SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, **kw)


def sampled(seed, **kw):
    return SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True, **kw)


@pytest.fixture()
def head(tiny_model, tokenizer):
    return HeadAdapter.create(tiny_model, tokenizer, "head", rank=8, tau=3.5, top_k=5, b_std=2.0, seed=11)


@pytest.fixture(params=["packed", "plain", "compiled"])
def engine(request, tiny_model, tokenizer, head, lora_setup):
    """Every engine test runs on three paths: oneDNN-prepacked linears (packed.py, the CPU default), plain
    F.linear (eager), and decode steps through torch.compile (compiled.py)."""
    step = {"packed": "fused", "plain": "reference", "compiled": "compiled"}[request.param]  # Engine(step=)
    eng = Engine(tiny_model, tokenizer, max_batch_size=8, step=step)
    assert bool(eng.packed) == eng.grouped_attention == (request.param != "plain")
    eng.add_adapter(head)
    eng.add_adapter(load_adapter(lora_setup[0]))
    yield eng
    assert eng.compiled is None or eng.compiled.failed is None  # the compiled path ran compiled, never fell back


def run(engine, prompt, sampling, **steering):
    return engine.generate([Request(prompt, sampling, SteeringParams(**steering))])[0]


@torch.no_grad()
def by_hand(model, prompt, n, adjust):
    """Greedy decoding with a plain HF forward per step over the whole sequence; `adjust(h, logits)`."""
    ids = list(prompt)
    for _ in range(n):
        h = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]  # (d,)
        logits = adjust(h, model.get_output_embeddings()(h).float())
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def base_entropies(model, prompt, completion):
    """Teacher-forced base entropy at each completion token."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(ids).logits[0, len(prompt) - 1 : -1]
    return entropy(logits).tolist()


def head_by_hand(model, adapter, k):
    w_u = model.get_output_embeddings().weight.float()

    def adjust(h, logits):
        cand = torch.topk(logits, k).indices
        correction = w_u[cand] @ (adapter.B @ (adapter.A @ h.float()))
        out = logits.clone()
        out[cand] += adapter.scale * correction
        return out

    return adjust


def test_threshold_inf_gives_base_tokens(engine, prompts):
    for adapter in ("head", "tiny-lora"):
        for sp in (greedy(), sampled(5)):
            base = run(engine, prompts[0], sp)
            gated = run(engine, prompts[0], sp, adapter=adapter, mode="gated", threshold=math.inf)
            assert gated.token_ids == base.token_ids
            assert gated.report.gate_fired == 0 and gated.report.tokens == N


def test_the_entropy_pass_runs_only_where_a_row_reads_it(engine, prompts, monkeypatch):
    """The gate's pass over the vocabulary runs for a batch with a row that compares its entropy (a finite gate)
    or reports it (a trace); rows in mode off, always, random or behind a +inf gate skip it, with the same tokens."""
    from reasonmaxxer.steering import engine as engine_module

    batches = []
    monkeypatch.setattr(engine_module, "entropy", lambda logits: batches.append(len(logits)) or entropy(logits))
    base = run(engine, prompts[0], greedy())
    for steering in ({"adapter": "head", "mode": "gated", "threshold": math.inf}, {"adapter": "head", "mode": "always"},
                     {"adapter": "head", "mode": "random", "rate": 0.5}):
        run(engine, prompts[0], greedy(), **steering)
    assert batches == [] and len(base.token_ids) == N
    traced = run(engine, prompts[0], greedy(), trace=True)
    assert traced.token_ids == base.token_ids and len(batches) == N
    assert [t.entropy for t in traced.report.trace] == pytest.approx(
        base_entropies(engine.model, prompts[0], base.token_ids), rel=1e-4, abs=1e-4)
    batches.clear()
    run(engine, prompts[0], greedy(), adapter="head", mode="gated", threshold=3.5)
    assert len(batches) == N


def test_always_head_equals_correction_by_hand(engine, tiny_model, head, prompts):
    ours = run(engine, prompts[1], greedy(), adapter="head", mode="always")
    assert ours.token_ids == by_hand(tiny_model, prompts[1], N, head_by_hand(tiny_model, head, 5))
    base = run(engine, prompts[1], greedy())
    assert ours.token_ids != base.token_ids, "the test adapter must be strong enough to change tokens"
    assert ours.report.gate_fired == N and ours.report.fire_rate == 1.0


def test_head_with_zero_b_equals_base(tiny_model, tokenizer, prompts):
    eng = Engine(tiny_model, tokenizer)
    eng.add_adapter(HeadAdapter.create(tiny_model, tokenizer, "zero", b_std=0.0))
    base = run(eng, prompts[2], sampled(3))
    assert run(eng, prompts[2], sampled(3), adapter="zero", mode="always").token_ids == base.token_ids


def test_lora_always_equals_peft(engine, lora_setup, prompts):
    peft_model = lora_setup[1]
    ours = run(engine, prompts[3], greedy(logprobs=0), adapter="tiny-lora", mode="always")
    with torch.no_grad():
        ids = torch.tensor([prompts[3] + ours.token_ids])
        ref = torch.log_softmax(peft_model(ids).logits[0, len(prompts[3]) - 1 : -1].float(), -1)
    assert ours.token_ids == ref.argmax(-1).tolist()
    ref_chosen = ref.gather(-1, torch.tensor(ours.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(ours.logprobs), ref_chosen, atol=1e-4)
    assert ours.token_ids != run(engine, prompts[3], greedy()).token_ids


def test_gated_threshold_zero_equals_always_for_head(engine, prompts):
    for sp in (greedy(), sampled(9)):
        gated = run(engine, prompts[0], sp, adapter="head", mode="gated", threshold=0.0)
        always = run(engine, prompts[0], sp, adapter="head", mode="always")
        assert gated.token_ids == always.token_ids


def test_gate_fires_exactly_where_entropy_exceeds_threshold(engine, tiny_model, prompts):
    tau = 3.4
    out = run(engine, prompts[1], greedy(), adapter="head", mode="gated", threshold=tau, trace=True)
    trace = out.report.trace
    assert [t.chosen_token for t in trace] == out.token_ids
    assert [t.position for t in trace] == list(range(N))
    # The cache is the base model's: trace entropies are the teacher-forced base entropies.
    ref = base_entropies(tiny_model, prompts[1], out.token_ids)
    assert [t.entropy for t in trace] == pytest.approx(ref, abs=1e-4)
    assert [t.fired for t in trace] == [t.entropy > tau for t in trace]
    assert out.report.gate_fired == sum(t.fired for t in trace)
    assert 0 < out.report.gate_fired < N
    assert all(t.chosen_token == t.base_token for t in trace if not t.fired)
    assert any(t.chosen_token != t.base_token for t in trace if t.fired)


def test_gated_lora_recomputes_only_the_current_position(engine, lora_setup, tiny_model, prompts):
    """Reference with PEFT: base cache for the prefix, LoRA on for the current token only."""
    peft_model, tau, prompt = lora_setup[1], 3.4, prompts[0]
    out = run(engine, prompt, greedy(), adapter="tiny-lora", mode="gated", threshold=tau, trace=True)
    ids = list(prompt)
    with torch.no_grad():
        for t in out.report.trace:
            base_logits = tiny_model(torch.tensor([ids])).logits[0, -1].float()
            assert entropy(base_logits[None]).item() == pytest.approx(t.entropy, abs=1e-4)
            if t.fired:
                kw = {cache_kwarg(tiny_model.model): DynamicCache()}
                with peft_model.disable_adapter():
                    peft_model(torch.tensor([ids[:-1]]), use_cache=True, **kw)
                logits = peft_model(torch.tensor([ids[-1:]]), **kw).logits[0, -1]
            else:
                logits = base_logits
            assert t.chosen_token == int(logits.argmax())
            ids.append(t.chosen_token)
    assert 0 < out.report.gate_fired < N


def test_request_in_mixed_batch_matches_alone(engine, prompts, tokenizer):
    target = dict(adapter="head", mode="gated", threshold=3.4)
    alone = run(engine, prompts[1], greedy(), **target)
    long_prompt = tokenizer("Weng earns $12 an hour. " * 6)["input_ids"]
    others = [
        Request(prompts[0], sampled(1), SteeringParams("tiny-lora", "always")),
        Request(long_prompt, SamplingParams(max_tokens=7, temperature=0.7, seed=2)),
        Request(prompts[2], greedy(), SteeringParams("tiny-lora", "gated", threshold=3.0)),
    ]
    first = Request(prompts[3], SamplingParams(max_tokens=5, temperature=0.0), SteeringParams("head", "always"))
    mine = Request(prompts[1], greedy(), SteeringParams(**target))
    engine.submit(first)
    for r in others:
        engine.submit(r)
    engine.step()
    engine.step()  # `mine` joins a running batch of mixed rows, two steps in
    results = {r.request_id: r for r in engine.generate([mine])}
    while engine.has_work:
        engine.step()
    assert results[mine.request_id].token_ids == alone.token_ids


def test_same_seed_same_output_different_seed_differs(engine, prompts):
    a = run(engine, prompts[0], sampled(42), adapter="head", mode="gated")
    b = run(engine, prompts[0], sampled(42), adapter="head", mode="gated")
    c = run(engine, prompts[0], sampled(43), adapter="head", mode="gated")
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_cancel_mid_way_leaves_others_running(engine, prompts):
    keep = Request(prompts[0], greedy())
    stop = Request(prompts[1], greedy())
    alone = run(engine, prompts[0], greedy())
    engine.submit(keep)
    engine.submit(stop)
    events = engine.step() + engine.step()
    engine.cancel(stop.request_id)
    while engine.has_work:
        events += engine.step()
    mine = [e for e in events if e.request_id == stop.request_id]
    assert mine[-1].finish_reason == "cancelled" and mine[-1].report.tokens == 2
    assert [e.token_id for e in events if e.request_id == keep.request_id] == alone.token_ids


def test_stop_string_eos_and_length(engine, prompts, tokenizer):
    full = run(engine, prompts[0], greedy())
    assert full.finish_reason == "length" and len(full.token_ids) == N
    stop_at = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = run(engine, prompts[0], greedy(stop=[stop_at]))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop_at)]
    token = full.token_ids[5]
    first = full.token_ids.index(token)
    ended = run(engine, prompts[0], greedy(stop_token_ids=[token]))
    assert ended.finish_reason == "stop" and ended.token_ids == full.token_ids[: first + 1]


def test_logprobs_report_the_chosen_distribution(engine, tiny_model, prompts):
    out = run(engine, prompts[2], greedy(logprobs=3), logprobs="base")
    ids = torch.tensor([prompts[2] + out.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(tiny_model(ids).logits[0, len(prompts[2]) - 1 : -1].float(), -1)
    assert out.logprobs == pytest.approx(ref.max(-1).values.tolist(), abs=1e-4)


def test_bad_requests_are_refused(engine, prompts):
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        engine.submit(Request(prompts[0], greedy(), SteeringParams("nope", "gated")))
    with pytest.raises(ValueError, match="needs an adapter"):
        SteeringParams(mode="gated")
    with pytest.raises(ValueError, match="mode 'sometimes' is unknown"):
        SteeringParams("head", "sometimes")
    with pytest.raises(ValueError, match="threshold"):
        SteeringParams("head", "gated", threshold=float("nan"))
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        engine.submit(Request(prompts[0], SamplingParams(max_tokens=300)))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request([], greedy()))
    assert not engine.has_work


def test_removed_adapter_finishes_in_flight_requests(engine, prompts):
    alone = run(engine, prompts[0], greedy(), adapter="tiny-lora", mode="always")
    req = Request(prompts[0], greedy(), SteeringParams("tiny-lora", "always"))
    engine.submit(req)
    engine.step()
    engine.remove_adapter("tiny-lora")
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.submit(Request(prompts[0], greedy(), SteeringParams("tiny-lora", "always")))
    events = []
    while engine.has_work:
        events += engine.step()
    assert [e.token_id for e in events if e.request_id == req.request_id][-N + 1 :] == alone.token_ids[1:]
    assert not engine.lora.names


def test_random_mode_fires_on_the_seeded_coin_whatever_the_entropy(engine, prompts):
    from reasonmaxxer.steering.gate import random_fire

    out = run(engine, prompts[0], sampled(5), adapter="head", mode="random", rate=0.3, trace=True)
    fired = [t.fired for t in out.report.trace]
    assert fired == [random_fire(5, t, 0.3) for t in range(len(fired))]
    assert out.report.gate_fired == sum(fired) > 0 and out.report.rate == 0.3 and out.report.threshold is None
    base = run(engine, prompts[0], sampled(5))
    never = run(engine, prompts[0], sampled(5), adapter="head", mode="random", rate=0.0)
    assert never.token_ids == base.token_ids and never.report.gate_fired == 0  # rate 0 is the base
    with pytest.raises(ValueError, match="needs a fire rate"):  # this adapter has no measured fire rate
        engine.submit(Request(prompts[0], sampled(5), SteeringParams("head", "random")))


def _state(model) -> dict:
    """What an engine could change on a model: module objects and their own forwards and hooks, the config
    (attention implementation included), the training flag, and which tensors hold the weights."""
    return {
        "modules": [(name, id(m), type(m).__name__, "forward" in vars(m), len(m._forward_hooks),
                     len(m._forward_pre_hooks), m.training) for name, m in model.named_modules()],
        "config": model.config.to_dict(), "attn": model.config._attn_implementation,
        "tensors": [(name, t.data_ptr(), t.dtype) for name, t in model.state_dict(keep_vars=True).items()],
    }


@pytest.mark.parametrize("kind", STEPS)
def test_building_an_engine_leaves_the_model_as_it_found_it(tokenizer, lora_setup, kind):
    """The engine's packed linears, attention implementation, fused groups, LoRA hooks and eval mode live on its
    own view (own.py). Checked on the state, then on a forward against a copy that never met an engine; the
    engine still decodes, and shares the model's weights (no copy)."""
    from conftest import make_model

    model = make_model(tokenizer).train()  # a flag the engine's eval() must not flip on the caller's model
    twin = copy.deepcopy(model).eval()
    before = _state(model)
    engine = Engine(model, tokenizer, step=kind)
    engine.add_adapter(load_adapter(lora_setup[0]))
    engine.generate([Request([1, 2, 3], greedy(), SteeringParams("tiny-lora", "gated", 0.0))])
    assert _state(model) == before
    assert engine.model is not model and engine.model.model.embed_tokens.weight is model.model.embed_tokens.weight
    model.eval()
    x = torch.tensor([[5, 9, 2, 40, 7]])
    with torch.inference_mode():
        assert torch.equal(model(x).logits, twin(x).logits)


def test_an_unknown_step_is_refused_with_the_steps_there_are(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="use one of reference, module, fused, compiled"):
        Engine(tiny_model, tokenizer, step="turbo")
