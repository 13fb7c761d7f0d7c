"""The score cache: a refit on cached scores is the same fit, runs no forward pass, and a different model
or sequence never reads another's scores."""

import copy

import pytest
import torch

from reasonmaxxer.training import score_cache
from reasonmaxxer.training.fit import FitArgs, fit
from reasonmaxxer.training.score_cache import model_signature, score_all
from reasonmaxxer.training.scoring import score_sequence

from conftest import sampled_records


@pytest.fixture(scope="module")
def rollouts(tiny_model, tokenizer, prompts):
    return sampled_records(tiny_model, tokenizer, prompts, max_tokens=12, seed_base=300)


def _count_scoring(monkeypatch) -> list[int]:
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return score_sequence(*args, **kwargs)

    monkeypatch.setattr(score_cache, "score_sequence", counted)
    return calls


def test_a_refit_on_cached_scores_is_the_same_fit_without_scoring(tiny_model, tokenizer, rollouts, tmp_path,
                                                                 monkeypatch):
    args = FitArgs(kind="head", name="c-head", target_fire_rate=0.2, rank=4, lr=3e-3, epochs=2, accumulation=2,
                   warmup=1)
    calls = _count_scoring(monkeypatch)
    first, _ = fit(tiny_model, tokenizer, rollouts, args, progress=False, score_cache=tmp_path)
    assert len(calls) == len(rollouts) and len(list(tmp_path.glob("*.pt"))) == 1
    second, _ = fit(tiny_model, tokenizer, rollouts, args, progress=False, score_cache=tmp_path)
    assert len(calls) == len(rollouts)  # nothing scored the second time
    assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)
    assert first.manifest.gate.tau == second.manifest.gate.tau
    uncached, _ = fit(tiny_model, tokenizer, rollouts, args, progress=False)
    assert torch.equal(first.B, uncached.B)


def test_cached_scores_equal_fresh_ones_and_new_sequences_are_added(tiny_model, rollouts, tmp_path, monkeypatch):
    calls = _count_scoring(monkeypatch)
    score_all(tiny_model, rollouts[:3], cache_dir=tmp_path, progress=False)
    got = score_all(tiny_model, rollouts[:5], cache_dir=tmp_path, progress=False)
    assert len(calls) == 5  # 3, then only the 2 new ones
    for r, s in zip(rollouts[:5], got, strict=True):
        fresh = score_sequence(tiny_model, r["prompt_ids"], r["completion_ids"])
        assert s.prompt_len == fresh.prompt_len
        for name in ("entropy", "hidden", "cand", "cand_logits", "lse", "token_logit", "token_slot"):
            assert torch.equal(getattr(s, name), getattr(fresh, name)), name


def test_another_model_or_setting_gets_another_cache_file(tiny_model):
    signature = model_signature(tiny_model, 5, True)
    assert signature == model_signature(tiny_model, 5, True)
    assert signature != model_signature(tiny_model, 3, True) != model_signature(tiny_model, 5, False)
    tuned = copy.deepcopy(tiny_model)
    with torch.no_grad():
        list(tuned.parameters())[-1].view(-1)[7] += 0.5  # one weight changed
    assert model_signature(tuned, 5, True) != signature


def test_scoring_stopped_by_ctrl_c_keeps_what_it_scored(tiny_model, rollouts, tmp_path, monkeypatch):
    calls = []

    def dying(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return score_sequence(*args, **kwargs)

    monkeypatch.setattr(score_cache, "score_sequence", dying)
    with pytest.raises(KeyboardInterrupt):
        score_all(tiny_model, rollouts[:5], cache_dir=tmp_path, progress=False)
    calls = _count_scoring(monkeypatch)
    score_all(tiny_model, rollouts[:5], cache_dir=tmp_path, progress=False)
    assert len(calls) == 2  # the 3 scored before the interruption were kept
