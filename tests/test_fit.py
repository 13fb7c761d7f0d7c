"""Fitting: problem selection, and head / LoRA fits that move probability the way the loss says."""

import copy

import pytest
import torch

from reasonmaxxer.steering.adapters import HeadAdapter, LoraAdapter
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request
from reasonmaxxer.steering.sampling import SamplingParams
from reasonmaxxer.training.fit import FitArgs, fit, head_diagnostics, prepare_items, select_problems

from conftest import sampled_records


def _records(rates: dict[str, list[float]]):
    return [{"problem_id": pid, "reward": r} for pid, rs in rates.items() for r in rs]


def test_select_problems_keeps_the_mixed_ones_closest_to_half():
    records = _records({"a": [1, 1, 1, 1], "b": [0, 0, 0, 0], "c": [1, 0, 0, 0], "d": [1, 1, 0, 0],
                        "e": [1, 1, 1, 0]})
    kept = select_problems(records, 2)
    assert [r["problem_id"] for r in kept] == ["d"] * 4 + ["c"] * 4  # c and e tie at 0.25 away: c by id
    with pytest.raises(ValueError, match="none of the 2 problems has mixed outcomes"):
        select_problems(_records({"a": [1, 1], "b": [0, 0]}), 5)


@pytest.fixture(scope="module")
def rollouts(tiny_model, tokenizer, prompts):
    """Real sampled completions of the tiny model, rewarded so that every problem is mixed."""
    return sampled_records(tiny_model, tokenizer, prompts, max_tokens=16, seed_base=100)


def test_head_fit_raises_good_tokens_and_lowers_bad_ones(tiny_model, tokenizer, rollouts):
    args = FitArgs(kind="head", name="t-head", target_fire_rate=0.2, rank=8, lr=3e-3, epochs=6, accumulation=2,
                   warmup=2, keep_problems=10)
    adapter, _ = fit(tiny_model, tokenizer, rollouts, args, progress=False)
    assert isinstance(adapter, HeadAdapter) and adapter.B.abs().sum() > 0
    history = adapter.manifest.provenance["losses"]
    assert history[-1]["decision"] < history[0]["decision"]
    items, tau, _ = prepare_items(tiny_model, select_problems(rollouts, 10), args, progress=False)
    assert tau == pytest.approx(adapter.manifest.gate.tau)
    d = head_diagnostics(tiny_model, items, adapter)
    assert d["logp_shift_positive"] > 0 > d["logp_shift_negative"]
    assert d["anchor_kl"] < 0.05
    assert adapter.manifest.gate.measured_fire_rate == pytest.approx(0.2, abs=0.02)


def test_lora_fit_returns_a_servable_adapter_and_restores_the_model(tiny_model, tokenizer, rollouts, prompts):
    model = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = FitArgs(kind="lora", name="t-lora", target_fire_rate=0.2, rank=4, lora_alpha=8, lr=1e-3,
                   accumulation=4, warmup=1, checkpoints=2)
    seen = []
    adapter, report = fit(model, tokenizer, rollouts, args, callback=lambda step, a: seen.append(step) or -step,
                          progress=False)
    assert isinstance(adapter, LoraAdapter) and seen == [2, 4]
    assert report["chosen_checkpoint"] == {"step": 2, "value": -2}
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    engine = Engine(model, tokenizer)
    engine.add_adapter(adapter)
    from reasonmaxxer.steering.request import SteeringParams

    out = engine.generate([Request(prompts[0], SamplingParams(max_tokens=4, temperature=0.0),
                                   SteeringParams("t-lora", "always"))])[0]
    assert len(out.token_ids) == 4


def test_fit_cli_fails_early_and_clearly_on_bad_input(tiny_model, tokenizer, tmp_path):
    import json
    import subprocess
    import sys

    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"q": "What is 2+3?", "a": "5"}) + "\n")
    cli = [sys.executable, "-m", "reasonmaxxer.cli"]
    made = subprocess.run([*cli, "rollouts", "--model", str(folder), "--problems", str(problems), "--question-field",
                           "q", "--answer-field", "a", "--samples", "2", "--max-new-tokens", "4",
                           "--out", str(tmp_path / "r.jsonl")], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    rollouts = str(tmp_path / "r.jsonl")
    cases = [
        (["--rollouts", rollouts, "--model", "smollm2-135m-instruct"], "fit on the model the rollouts"),
        (["--rollouts", rollouts, "--model", str(folder)], "none of the 1 problems has mixed"),
        (["--rollouts", str(tmp_path / "missing.jsonl"), "--model", str(folder)], "run `reasonmaxxer rollouts` first"),
        (["--model", str(folder)], "fit needs --rollouts"),
        (["--problems", str(problems), "--model", str(folder)], "--question-field"),
    ]
    for extra, message in cases:
        out = subprocess.run([*cli, "fit", "--out", str(tmp_path / "ad"), *extra], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2, (extra, out.stderr[-2000:])
        assert message in out.stderr, (message, out.stderr[-2000:])
        assert not (tmp_path / "ad").exists()


def test_a_fit_that_lowers_the_positive_tokens_is_flagged():
    from reasonmaxxer.training.fit_cli import collapse_warning

    assert collapse_warning({"logp_shift_positive": 0.08, "logp_shift_negative": -0.1, "anchor_kl": 0.004}) is None
    warning = collapse_warning({"logp_shift_positive": -0.497, "logp_shift_negative": -0.808, "anchor_kl": 0.13})
    assert "-0.497" in warning and "--lr" in warning


def test_a_fit_with_no_positive_token_at_a_decision_point_says_so_not_that_it_lowered_them():
    from reasonmaxxer.training.fit_cli import collapse_warning

    warning = collapse_warning({"logp_shift_positive": float("nan"), "logp_shift_negative": -0.14, "anchor_kl": 4e-4})
    assert "no positive-advantage token" in warning and "nan" not in warning and "--samples" in warning
