"""Gate math on hand-made tensors."""

import math

import pytest
import torch

from reasonmaxxer.steering.gate import entropy, gate_mask, random_fire, topk_candidates


def test_entropy_uniform_is_log_vocab_and_one_hot_is_zero():
    logits = torch.stack([torch.zeros(1000), torch.tensor([0.0] + [-1e4] * 999)])
    h = entropy(logits)
    assert h.dtype == torch.float32
    assert h[0].item() == pytest.approx(math.log(1000), rel=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_matches_definition_and_ignores_masked_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0, -math.inf]])
    p = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    expected = -(p * p.log()).sum()
    assert entropy(logits)[0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(entropy(logits)).all()


def test_entropy_is_float32_for_bf16_input():
    logits = torch.randn(3, 50).to(torch.bfloat16)
    h = entropy(logits)
    assert h.dtype == torch.float32
    assert torch.allclose(h, entropy(logits.float()))


def test_gate_is_strict_and_inf_never_fires():
    h = torch.tensor([0.5, 1.2, 1.3])
    assert gate_mask(h, 1.2).tolist() == [False, False, True]
    assert gate_mask(h, math.inf).tolist() == [False, False, False]
    assert gate_mask(h, torch.tensor([0.0, 1.0, 2.0])).tolist() == [True, True, False]


def test_topk_candidates_are_the_largest_in_order():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert topk_candidates(logits, 3).tolist() == [[1, 3, 4]]
    assert topk_candidates(logits, 10).shape == (1, 5)
    with pytest.raises(ValueError, match="top_k"):
        topk_candidates(logits, 0)


def test_random_fire_is_a_deterministic_coin_of_the_given_rate():
    coins = [random_fire(7, t, 0.3) for t in range(20000)]
    assert coins == [random_fire(7, t, 0.3) for t in range(20000)]  # same key, same positions
    assert abs(sum(coins) / len(coins) - 0.3) < 0.015
    assert coins != [random_fire(8, t, 0.3) for t in range(20000)]  # another key, other positions
    assert not any(random_fire(7, t, 0.0) for t in range(1000)) and all(random_fire(7, t, 1.0) for t in range(1000))
