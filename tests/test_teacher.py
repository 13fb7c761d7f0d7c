"""Teachers in the decode engine: identities, the lazy prefill against a full forward, refusal, mixed batches."""

import math

import pytest
import torch

from reasonmaxxer.steering.adapters import AdapterError, HeadAdapter, load_adapter
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams
from reasonmaxxer.steering.teacher import Teacher, TeacherCursor, restrict

from conftest import make_model, make_tokenizer

N = 20


def greedy(**kw):
    return SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True, **kw)


def sampled(seed, **kw):
    return SamplingParams(max_tokens=N, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def other_model(tokenizer):
    return make_model(tokenizer, seed=7)


@pytest.fixture()
def engine(tiny_model, tokenizer, other_model, lora_setup):
    eng = Engine(tiny_model, tokenizer, max_batch_size=8)
    eng.add_adapter(Teacher.create(tiny_model, tokenizer, "self", tau=3.0, rate=0.3))
    eng.add_adapter(Teacher.create(other_model, tokenizer, "other", tau=3.0, rate=0.3))
    eng.add_adapter(HeadAdapter.create(tiny_model, tokenizer, "head", rank=8, tau=3.5, b_std=2.0, seed=11))
    eng.add_adapter(load_adapter(lora_setup[0]))
    return eng


def run(engine, prompt, sampling, **steering):
    return engine.generate([Request(prompt, sampling, SteeringParams(**steering))])[0]


def drain(engine, staggered):
    """Submit each group of requests one step after the last; step to the end. -> {request id: Completion}"""
    from reasonmaxxer.steering.engine import _completion

    events = {}
    for group in staggered:
        for r in group:
            engine.submit(r)
            events[r.request_id] = []
        for e in engine.step():
            events[e.request_id].append(e)
    while engine.has_work:
        for e in engine.step():
            events[e.request_id].append(e)
    return {rid: _completion(rid, evs) for rid, evs in events.items()}


@torch.no_grad()
def full_logits(model, ids):
    """Next-token logits at every position of `ids` from one plain forward. (n, V) float32."""
    return model(torch.tensor([ids])).logits[0].float()


def test_base_as_its_own_teacher_gives_the_base(engine, prompts):
    for prompt in prompts[:2]:
        base = run(engine, prompt, greedy()).token_ids
        for mode in ("gated", "always", "random"):
            for k in (5, 0):
                out = run(engine, prompt, greedy(), adapter="self", mode=mode, top_k=k)
                assert out.token_ids == base, (mode, k)
                assert out.report.gate_fired > 0
        seeded = run(engine, prompt, sampled(3)).token_ids
        for mode in ("gated", "always"):
            assert run(engine, prompt, sampled(3), adapter="self", mode=mode, top_k=0).token_ids == seeded


def test_threshold_inf_gives_base_and_costs_no_teacher_token(engine, prompts):
    for sp in (greedy(), sampled(5)):
        base = run(engine, prompts[0], sp)
        out = run(engine, prompts[0], sp, adapter="other", mode="gated", threshold=math.inf)
        assert out.token_ids == base.token_ids
        assert out.report.gate_fired == 0 and out.report.teacher_tokens == 0


def test_always_with_full_distribution_is_the_teachers_own_greedy(engine, prompts, other_model):
    ids = list(prompts[1])
    for _ in range(N):
        ids.append(int(full_logits(other_model, ids)[-1].argmax()))
    out = run(engine, prompts[1], greedy(), adapter="other", mode="always", top_k=0)
    assert out.token_ids == ids[len(prompts[1]):]
    assert out.report.teacher_tokens == len(ids) - 1  # the prompt once, then one token per step
    assert out.token_ids != run(engine, prompts[1], greedy()).token_ids  # the teacher does change the text


def test_gated_teacher_picks_the_teachers_best_base_candidate(engine, prompts, tiny_model, other_model):
    out = run(engine, prompts[0], greedy(), adapter="other", mode="gated", top_k=3, trace=True)
    ids = list(prompts[0])
    for t in out.report.trace:
        base = full_logits(tiny_model, ids)[-1]
        if t.fired:
            cand = torch.topk(base, 3).indices
            teacher = full_logits(other_model, ids)[-1]
            assert t.chosen_token == int(cand[teacher[cand].argmax()])
        else:
            assert t.chosen_token == int(base.argmax())
        ids.append(t.chosen_token)
    fired = [i for i, t in enumerate(out.report.trace) if t.fired]
    assert 0 < len(fired) < N
    assert out.report.teacher_tokens == len(prompts[0]) + fired[-1]  # text up to the last fire, once


def test_lazy_prefill_equals_a_full_forward(other_model, tokenizer, prompts):
    teacher = Teacher.create(other_model, tokenizer, "t")
    cursor = TeacherCursor(teacher)
    ids = [*list(prompts[3]), 5, 17, 40, 41, 9, 100, 3, 77, 12]
    reference = full_logits(other_model, ids)  # (n, V)
    for end in (len(prompts[3]), len(prompts[3]) + 1, len(prompts[3]) + 4, len(prompts[3]) + 5, len(ids)):
        got = cursor.logits(ids[:end])
        torch.testing.assert_close(got, reference[end - 1], atol=2e-4, rtol=1e-4)
    assert cursor.tokens == len(ids)
    with pytest.raises(ValueError, match="at least one new token"):
        cursor.logits(ids)


def test_lazy_prefill_exact_with_rows_joining_and_leaving(engine, prompts, other_model, tokenizer):
    """Logprobs at fired positions, top_k 0, are the teacher's own: a full forward over the same prefix."""
    long_prompt = tokenizer("Weng earns $12 an hour. " * 4)["input_ids"]
    reqs = [Request(p, SamplingParams(max_tokens=n, temperature=1.0, seed=s, ignore_eos=True, logprobs=1),
                    SteeringParams("other", "gated", threshold=3.2, top_k=0, trace=True))
            for p, n, s in ((prompts[0], 12, 1), (long_prompt, 5, 2), (prompts[2], 16, 3))]
    plain = Request(prompts[1], SamplingParams(max_tokens=3))  # a plain row that leaves early
    results = drain(engine, [reqs[:1], [plain], reqs[1:]])
    checked = 0
    for r in reqs:
        out = results[r.request_id]
        ids = list(r.prompt_ids) + out.token_ids
        teacher = torch.log_softmax(full_logits(other_model, ids), dim=-1)
        for t, lp in zip(out.report.trace, out.logprobs, strict=True):
            if t.fired:
                pos = len(r.prompt_ids) + t.position - 1
                assert lp == pytest.approx(float(teacher[pos, t.chosen_token]), abs=2e-4)
                checked += 1
    assert checked >= 3


def test_teacher_with_another_vocabulary_is_refused(tiny_model, tokenizer):
    other_tok = make_tokenizer(vocab_size=330)
    stranger = Teacher.create(make_model(other_tok, seed=2), other_tok, "stranger")
    engine = Engine(tiny_model, tokenizer)
    with pytest.raises(AdapterError, match=r"vocabularies differ .*320 tokens against 330"):
        engine.add_adapter(stranger)
    assert "stranger" not in engine.adapters


def test_restrict_keeps_the_base_candidates_only():
    base = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    teacher = torch.tensor([9.0, 1.0, 5.0, 0.5, 8.0, 7.0])  # one row longer: cut to the base's vocabulary
    out = restrict(teacher, base, 2)
    assert out.tolist() == [-math.inf, 1.0, -math.inf, 0.5, -math.inf]
    assert restrict(teacher, base, 0).tolist() == teacher[:5].tolist()
    assert restrict(teacher[:4], base, 0).tolist() == [9.0, 1.0, 5.0, 0.5, -math.inf]


def test_top_k_zero_is_for_teachers_only(engine, prompts):
    with pytest.raises(ValueError, match="for teachers only"):
        engine.submit(Request(prompts[0], greedy(), SteeringParams("head", "gated", top_k=0)))


def test_mixed_batch_teacher_adapter_and_plain_rows_match_alone(engine, prompts, tokenizer):
    specs = [
        (prompts[1], sampled(4), SteeringParams("other", "gated", threshold=3.1)),
        (prompts[0], greedy(), SteeringParams("head", "gated", threshold=3.4)),
        (prompts[2], sampled(6), SteeringParams("tiny-lora", "always")),
        (tokenizer("Weng earns $12 an hour. " * 5)["input_ids"], SamplingParams(max_tokens=6, seed=2),
         SteeringParams()),
        (prompts[3], greedy(), SteeringParams("other", "always", top_k=0)),
    ]
    alone = [engine.generate([Request(p, sp, st)])[0].token_ids for p, sp, st in specs]
    reqs = [Request(p, sp, st) for p, sp, st in specs]
    results = drain(engine, [reqs[:3], [], reqs[3:]])  # two rows join a running mixed batch, two steps in
    assert [results[r.request_id].token_ids for r in reqs] == alone


def test_batched_prefills_equal_each_rows_own(other_model, tokenizer, prompts):
    """Rows at different points (a fresh one, ones that saw part of their text), different new-token counts:
    one batched call gives every row the logits of its own lazy prefill, and leaves caches that continue alike."""
    from reasonmaxxer.steering.teacher import next_logits

    teacher = Teacher.create(other_model, tokenizer, "t")
    texts = [[*list(p), 5, 17, 40, 41, 9, 100, 3][: len(p) + extra] for p, extra in zip(prompts, (7, 1, 3, 5),
                                                                                         strict=True)]
    head = [0, len(prompts[1]), len(prompts[2]) - 2, len(prompts[3]) + 2]  # what each row's cursor has seen
    alone, together = [TeacherCursor(teacher) for _ in texts], [TeacherCursor(teacher) for _ in texts]
    for cursors in (alone, together):
        for c, t, k in zip(cursors, texts, head, strict=True):
            if k:
                c.logits(t[:k])
    want = [c.logits(t) for c, t in zip(alone, texts, strict=True)]
    got = next_logits(together, texts)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-4, rtol=1e-4)
    assert [c.seen for c in together] == [len(t) for t in texts] and \
        [c.tokens for c in together] == [c.tokens for c in alone]
    more = [[*t, 11, 12] for t in texts]  # the caches the batch left behind carry on like the rows' own
    for c_a, c_t, t in zip(alone, together, more, strict=True):
        torch.testing.assert_close(c_t.logits(t), c_a.logits(t), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_batched_teacher_steps_equal_the_per_row_path_token_for_token(engine, prompts, tokenizer, monkeypatch,
                                                                     sampling):
    """Eight streams on two teachers, gated and random, rows joining late: the same tokens and teacher counts
    whether a step's fired rows share one teacher forward or run one each."""
    from reasonmaxxer.steering import corrections

    def requests():
        texts = [*prompts, *(tokenizer(f"Question {i}: how many apples?")["input_ids"] for i in range(4))]
        out = []
        for i, p in enumerate(texts):
            sp = greedy(seed=100 + i) if sampling == "greedy" else sampled(100 + i)  # the seed keys random's coins
            steering = SteeringParams("other" if i % 3 else "self", "random" if i % 2 else "gated", threshold=2.0,
                                      rate=0.5)
            out.append(Request(p, sp, steering))
        return out

    def finish(reqs):
        results = drain(engine, [reqs[:5], reqs[5:]])
        return [(results[r.request_id].token_ids, results[r.request_id].report.teacher_tokens) for r in reqs]

    calls = []
    batched = corrections.next_logits
    monkeypatch.setattr(corrections, "next_logits", lambda cs, ts: (calls.append(len(cs)), batched(cs, ts))[1])
    together = finish(requests())
    assert max(calls) >= 3  # several rows of one teacher fired in one step
    monkeypatch.setattr(corrections, "next_logits", lambda cs, ts: [c.logits(t) for c, t in zip(cs, ts, strict=True)])
    alone = finish(requests())
    assert together == alone
    assert all(n > 0 for _, n in together)
