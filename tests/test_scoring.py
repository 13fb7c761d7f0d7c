"""Teacher-forced scoring: index alignment with the decode engine, and tau calibration."""

import pytest
import torch

from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams
from reasonmaxxer.training.scoring import calibrate_tau, score_sequence


def test_entropy_index_i_is_completion_token_i(tiny_model, tokenizer, prompts):
    """The engine's trace entropy for token i (the distribution it was sampled from) == scoring's entry i."""
    engine = Engine(tiny_model, tokenizer)
    from reasonmaxxer.steering.adapters import HeadAdapter

    engine.add_adapter(HeadAdapter.create(tiny_model, tokenizer, "h"))
    sp = SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True)
    out = engine.generate([Request(prompts[1], sp, SteeringParams("h", "gated", float("inf"), trace=True))])[0]
    scored = score_sequence(tiny_model, prompts[1], out.token_ids)
    trace = torch.tensor([t.entropy for t in out.report.trace])
    assert scored.completion_entropy.shape == (20,)
    assert torch.allclose(scored.completion_entropy, trace, atol=1e-4)
    # Shifted by one, they disagree: the check above can fail.
    assert not torch.allclose(scored.entropy[len(prompts[1]) - 2 : -1], trace, atol=1e-4)
    # The next-token statistics point at the completion tokens themselves.
    start = len(prompts[1]) - 1
    base_top = torch.tensor([t.base_token for t in out.report.trace])
    assert torch.equal(scored.cand[start:, 0], base_top)
    nxt = torch.tensor(out.token_ids)
    in_cand = scored.token_slot[start:] >= 0
    assert torch.equal(scored.cand[start:][in_cand].gather(1, scored.token_slot[start:][in_cand, None])[:, 0],
                       nxt[in_cand])
    logits = tiny_model(torch.tensor([prompts[1] + out.token_ids])).logits[0, start:-1].float()
    assert torch.allclose(scored.token_logit[start:], logits.gather(1, nxt[:, None])[:, 0], atol=1e-4)
    assert torch.allclose(scored.lse[start:], torch.logsumexp(logits, -1), atol=1e-4)


def test_calibration_hits_its_target():
    h = torch.arange(1000, dtype=torch.float32) / 100
    for target in (0.03, 0.05, 0.5):
        tau = calibrate_tau(h, target)
        assert (h > tau).float().mean().item() == pytest.approx(target)
    with pytest.raises(ValueError, match="no entropies"):
        calibrate_tau([], 0.03)
    with pytest.raises(ValueError, match="target fire rate"):
        calibrate_tau(h, 1.5)
