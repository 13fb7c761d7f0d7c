"""Batched sampling: greedy, per-row filters against a single-row reference, counter-based draws."""

import pytest
import torch

from reasonmaxxer.steering.sampling import SamplingParams, logits_to_probs, row_seed, sample, uniform


def _logits():
    torch.manual_seed(0)
    return torch.randn(4, 100) * 3


def test_temperature_zero_is_argmax():
    logits = _logits()
    params = [SamplingParams(temperature=0.0)] * 4
    assert torch.equal(sample(logits, params, [0.5] * 4), logits.argmax(-1))


def test_filters_keep_exactly_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    probs = logits_to_probs(logits, [SamplingParams(top_k=2)])
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    probs = logits_to_probs(logits, [SamplingParams(top_p=0.8)])  # 0.5 + 0.3 reaches 0.8
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    probs = logits_to_probs(logits, [SamplingParams(top_p=0.81)])
    assert (probs[0] > 0).tolist() == [True, True, True, False]
    probs = logits_to_probs(logits, [SamplingParams(min_p=0.2)])  # keep p >= 0.1
    assert (probs[0] > 0).tolist() == [True, True, True, False]
    assert probs.sum().item() == pytest.approx(1.0)


def test_rows_filter_independently():
    logits = _logits()
    params = [SamplingParams(top_k=1), SamplingParams(), SamplingParams(top_p=1e-6), SamplingParams(min_p=0.0)]
    probs = logits_to_probs(logits, params)
    assert (probs[0] > 0).sum() == 1 and (probs[2] > 0).sum() == 1
    assert torch.allclose(probs[1], torch.softmax(logits[1], -1))


def test_same_seed_same_samples_independent_of_batch():
    logits = _logits()
    params = [SamplingParams(temperature=1.0, seed=7)] * 4
    draws = [uniform(7, 3)] * 4
    a = [sample(logits, params, draws).tolist() for _ in range(2)]
    assert a[0] == a[1]
    alone = sample(logits[2:3], params[:1], draws[:1])
    assert alone.item() == a[0][2]


def test_a_rows_draws_do_not_depend_on_its_batch_mates():
    torch.manual_seed(1)
    logits = torch.randn(6, 500) * 2
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s) for s in range(6)]
    draws = [uniform(s, 5) for s in range(6)]
    full = sample(logits, params, draws)
    for keep in ([0, 3], [3], [5, 3, 1], [3, 4]):
        part = sample(logits[keep], [params[i] for i in keep], [draws[i] for i in keep])
        assert part.tolist() == full[keep].tolist()
    mates = [SamplingParams(temperature=0.0), SamplingParams(top_k=3, temperature=2.0, seed=9)]
    mixed = sample(torch.cat([logits[3:4], logits[:2]]), [params[3], *mates], [draws[3], 0.0, 0.7])
    assert mixed[0] == full[3]


def _reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's filters written out token by token (no batching, float64): the single-row reference."""
    z = row.double() / max(p.temperature, 1e-5)
    order = z.argsort(descending=True).tolist()
    if p.top_k:
        order = order[: p.top_k]
    probs = torch.softmax(z[order], -1).tolist()  # over the top-k
    kept, mass = [], 0.0
    for t, q in zip(order, probs, strict=True):
        if kept and mass >= p.top_p:
            break
        if kept and q < p.min_p * probs[0]:
            break
        kept.append(t)
        mass += q
    mask = torch.full_like(z, -float("inf"))
    mask[kept] = 0.0
    return torch.softmax(z + mask, -1)


def test_batched_filters_match_the_single_row_reference():
    torch.manual_seed(2)
    logits = torch.randn(5, 300) * 2.5
    params = [SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=1.3, top_k=20),
              SamplingParams(min_p=0.05), SamplingParams(temperature=0.5, top_k=50, top_p=0.8, min_p=0.02),
              SamplingParams(temperature=1.0)]
    batched = logits_to_probs(logits, params)
    for i, p in enumerate(params):
        ref = _reference_probs(logits[i], p)
        assert ((batched[i] > 0) == (ref > 0)).all(), i
        torch.testing.assert_close(batched[i].double(), ref, atol=1e-6, rtol=1e-5)


def test_inverse_cdf_draws_follow_the_distribution():
    logits = torch.tensor([[0.5, 0.0, 0.3, 0.2]]).log()  # token 1: probability 0 (logit -inf)
    params = [SamplingParams(temperature=1.0)]
    counts = torch.zeros(4)
    for t in range(4000):
        counts[sample(logits, params, [uniform(11, t)])] += 1
    assert counts[1] == 0  # a zero-probability token is never drawn
    assert (counts / 4000).tolist() == pytest.approx([0.5, 0.0, 0.3, 0.2], abs=0.03)
    assert sample(logits, params, [0.0]).item() == 0 and sample(logits, params, [1 - 2**-53]).item() == 3


def test_draws_are_counter_based():
    assert uniform(5, 0) == uniform(5, 0) and uniform(5, 0) != uniform(5, 1) and uniform(5, 0) != uniform(6, 0)
    assert all(0 <= uniform(s, t) < 1 for s in range(5) for t in range(50))
    assert row_seed(12) == 12 and row_seed(None) != row_seed(None)


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    draws = {sample(logits, [SamplingParams(seed=s)], [uniform(s, 0)]).item() for s in range(20)}
    assert len(draws) > 10


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
     ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop")],
)
def test_bad_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_the_top_k_search_equals_the_full_sort(monkeypatch):
    """A kept set found among the top NUCLEUS_K tokens, or by the full sort when it reaches past them, is
    logits_to_probs' and draws the same token as the full sort at every draw."""
    from reasonmaxxer.steering import sampling

    torch.manual_seed(3)
    logits = torch.randn(4, 3000) * torch.tensor([[3.0], [0.05], [2.0], [0.01]])  # rows 1 and 3 nearly flat
    params = [SamplingParams(temperature=0.6, top_p=0.95), SamplingParams(top_p=0.9),
              SamplingParams(top_k=40, min_p=0.1), SamplingParams(min_p=0.5)]
    monkeypatch.setattr(sampling, "NUCLEUS_K", 64)
    z = sampling._tempered(logits, params)
    _, _, fits = sampling._nucleus(z, params, 64)
    assert fits.tolist() == [True, False, True, False]  # the flat rows keep more than 64 tokens: full sort
    draws = [[uniform(s, t) for s in range(4)] for t in range(40)]
    small = [sample(logits, params, d) for d in draws]
    monkeypatch.setattr(sampling, "NUCLEUS_K", 3000)
    full = [sample(logits, params, d) for d in draws]
    assert all(torch.equal(a, b) for a, b in zip(small, full, strict=True))
    dense = logits_to_probs(logits, params)
    for t in small:  # every drawn token is in logits_to_probs' kept set
        assert (dense.gather(1, t[:, None]) > 0).all()


def test_top_k_of_the_vocabulary_or_more_samples_as_no_top_k():
    logits = _logits()
    draws = [uniform(3, t) for t in range(4)]
    plain = sample(logits, [SamplingParams(seed=3)] * 4, draws)
    assert torch.equal(sample(logits, [SamplingParams(seed=3, top_k=100)] * 4, draws), plain)
    assert torch.equal(sample(logits, [SamplingParams(seed=3, top_k=10**9)] * 4, draws), plain)


def test_a_distribution_that_is_not_finite_is_an_error_not_a_token():
    logits = _logits()
    logits[1] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        sample(logits, [SamplingParams(seed=1)] * 4, [0.5] * 4)
    with pytest.raises(ValueError, match="not finite"):
        sample(logits, [SamplingParams(seed=1, top_p=0.9)] * 4, [0.5] * 4)
