"""Per-row sampling: greedy, filters, generators."""

import pytest
import torch

from reasonmaxxer.steering.sampling import SamplingParams, logits_to_probs, make_generator, sample


def _logits():
    torch.manual_seed(0)
    return torch.randn(4, 100) * 3


def test_temperature_zero_is_argmax():
    logits = _logits()
    params = [SamplingParams(temperature=0.0)] * 4
    assert torch.equal(sample(logits, params, [make_generator(0)] * 4), logits.argmax(-1))


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
    a = [sample(logits, params, [make_generator(7) for _ in range(4)]).tolist() for _ in range(2)]
    assert a[0] == a[1]
    alone = sample(logits[2:3], params[:1], [make_generator(7)])
    assert alone.item() == a[0][2]


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    draws = {sample(logits, [SamplingParams(seed=s)], [make_generator(s)]).item() for s in range(20)}
    assert len(draws) > 10


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
     ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"), ({"logprobs_source": "x"}, "logprobs_source")],
)
def test_bad_params_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
