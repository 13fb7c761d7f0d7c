"""The ReasonMaxxer loss on hand-made tensors."""

import math

import pytest
import torch

from reasonmaxxer.training.loss import (
    decision_loss,
    group_advantages,
    head_kl,
    head_log_probs,
    kl_anchor,
    sequence_loss,
)


def test_group_advantages_standardise_and_clip():
    assert group_advantages([1, 0, 0, 1]) == pytest.approx([1, -1, -1, 1], abs=1e-6)
    assert group_advantages([1, 1, 1]) == [0.0, 0.0, 0.0]
    a = group_advantages([1] + [0] * 19)
    assert a[0] == 2.5  # (1 - 0.05) / sqrt(0.05 * 0.95) = 4.36, clipped
    assert a[1] == pytest.approx(-0.05 / math.sqrt(0.05 * 0.95), rel=1e-6)
    assert group_advantages([1] + [0] * 19, clip=10.0)[0] == pytest.approx(0.95 / math.sqrt(0.0475), rel=1e-6)


def test_decision_term_sign_and_gradient():
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    decision = torch.tensor([True, False, True])
    loss = decision_loss(logp, decision, advantage=1.5)
    assert loss.item() == pytest.approx(1.5 * (1 + 3) / 2)
    loss.backward()
    # Positive advantage: raising log p at decision tokens lowers the loss; other tokens untouched.
    assert logp.grad.tolist() == pytest.approx([-0.75, 0.0, -0.75])
    logp.grad = None
    decision_loss(logp, decision, advantage=-1.0).backward()
    assert logp.grad[0].item() > 0  # negative advantage pushes those tokens down


def test_decision_term_is_a_per_sequence_mean():
    short = decision_loss(torch.tensor([-2.0]), torch.tensor([True]), 1.0)
    long = decision_loss(torch.full((10,), -2.0), torch.ones(10, dtype=torch.bool), 1.0)
    assert short.item() == long.item() == 2.0


def test_zero_advantage_or_no_decision_points_leaves_only_the_anchor():
    logp = torch.tensor([-1.0, -2.0])
    assert decision_loss(logp, torch.tensor([True, True]), 0.0).item() == 0.0
    assert decision_loss(logp, torch.tensor([False, False]), 2.0).item() == 0.0
    anchor = torch.tensor(0.3)
    assert sequence_loss(logp, torch.tensor([True, True]), 0.0, anchor, kl_weight=0.2).item() == pytest.approx(0.06)


def test_anchor_is_zero_when_adapted_equals_base_and_positive_otherwise():
    torch.manual_seed(0)
    base = torch.randn(4, 50)
    mask = torch.tensor([True, False, True, True])
    assert kl_anchor(base, base.clone(), mask).item() == pytest.approx(0.0, abs=1e-7)
    other = base.clone()
    other[1] += 5 * torch.randn(50)  # a position outside the mask does not count
    assert kl_anchor(base, other, mask).item() == pytest.approx(0.0, abs=1e-7)
    other[0] += torch.randn(50)
    kl = kl_anchor(base, other, mask).item()
    p, q = torch.log_softmax(base[0], -1), torch.log_softmax(other[0], -1)
    assert kl == pytest.approx(((p.exp() * (p - q)).sum() / 3).item(), rel=1e-5)


def _full(base, cand, delta):
    return base.scatter_add(1, cand, delta)


def test_head_statistics_match_the_full_vocabulary():
    torch.manual_seed(1)
    base = torch.randn(6, 40) * 2
    cand = torch.topk(base, 5).indices
    delta = torch.randn(6, 5)
    lse = torch.logsumexp(base, -1)
    full = _full(base, cand, delta)
    ref_kl = (torch.softmax(base, -1) * (torch.log_softmax(base, -1) - torch.log_softmax(full, -1))).sum(-1)
    assert torch.allclose(head_kl(base.gather(1, cand), delta, lse), ref_kl, atol=1e-5)
    tokens = torch.tensor([int(cand[0, 2]), int(cand[1, 0]), 0, 1, 2, 3])
    slots = torch.tensor([(cand[i] == t).nonzero()[0, 0].item() if (cand[i] == t).any() else -1
                          for i, t in enumerate(tokens.tolist())])
    assert (slots == -1).any() and (slots >= 0).any()
    ref = torch.log_softmax(full, -1).gather(1, tokens[:, None])[:, 0]
    ours = head_log_probs(base.gather(1, cand), delta, lse, base.gather(1, tokens[:, None])[:, 0], slots)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(head_kl(base.gather(1, cand), torch.zeros(6, 5), lse), torch.zeros(6), atol=1e-6)
