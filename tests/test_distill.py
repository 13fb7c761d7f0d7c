"""`fit --teacher`: distilling a teacher's choices at decision points into a head or LoRA adapter."""

import pytest
import torch

from reasonmaxxer.training import distill
from reasonmaxxer.training.distill import candidate_kl
from reasonmaxxer.training.fit import FitArgs, fit

from conftest import make_model, sampled_records


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return make_model(tokenizer, seed=7)


@pytest.fixture(scope="module")
def rollouts(tiny_model, tokenizer, prompts):
    records = sampled_records(tiny_model, tokenizer, prompts, max_tokens=16, seed_base=100)
    for r in records:
        r["reward"] = 0.0  # no rewards needed: a distillation uses every rollout, mixed or not
    return records


def test_candidate_kl_is_zero_on_equal_rankings_and_positive_otherwise():
    t = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    assert candidate_kl(t, t + 3.0).abs().max() < 1e-6  # a shift of every candidate changes nothing
    assert (candidate_kl(t, t.flip(-1)) > 0.1).all()
    with_inf = torch.tensor([[1.0, float("-inf"), 0.0]])
    assert torch.isfinite(candidate_kl(with_inf, torch.zeros(1, 3))).all()
    assert candidate_kl(t, t, "argmax").tolist() == pytest.approx(
        (-torch.log_softmax(t, -1).max(-1).values).tolist())


def test_head_distillation_moves_towards_the_teacher_and_keeps_the_anchor(tiny_model, tokenizer, rollouts,
                                                                          teacher, tmp_path):
    args = FitArgs(kind="head", name="t-distil", target_fire_rate=0.25, rank=8, lr=3e-3, epochs=8, accumulation=2,
                   warmup=2, seed=3)
    adapter, report = fit(tiny_model, tokenizer, rollouts, args, progress=False, teacher=teacher,
                          score_cache=str(tmp_path))
    d = report["data"]["diagnostics"]
    assert d["teacher_kl_adapted"] < 0.6 * d["teacher_kl_base"], d
    assert d["anchor_kl"] < 0.05, d
    assert report["data"]["sequences"] == len(rollouts)  # every problem kept, though none is mixed
    # A refit from the cache runs no teacher forward.
    def no_forward(*a, **k):
        raise AssertionError("the teacher ran again")
    distill._teacher_cand, saved = no_forward, distill._teacher_cand
    try:
        again, _ = fit(tiny_model, tokenizer, rollouts, args, progress=False, teacher=teacher,
                       score_cache=str(tmp_path))
    finally:
        distill._teacher_cand = saved
    assert torch.equal(again.B, adapter.B)


def test_argmax_target_and_lora_distillation_lower_their_loss(tiny_model, tokenizer, rollouts, teacher):
    args = FitArgs(kind="head", name="t-hard", target_fire_rate=0.25, rank=8, lr=3e-3, epochs=6, accumulation=2,
                   warmup=2, teacher_target="argmax")
    hard, _ = fit(tiny_model, tokenizer, rollouts, args, progress=False, teacher=teacher)
    history = hard.manifest.provenance["losses"]
    assert history[-1]["decision"] < 0.8 * history[0]["decision"]
    lora_args = FitArgs(kind="lora", name="t-lora-distil", target_fire_rate=0.25, rank=4, lora_alpha=8, lr=3e-3,
                        epochs=3, accumulation=2, warmup=1)
    weights = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    adapter, _ = fit(tiny_model, tokenizer, rollouts[:8], lora_args, progress=False, teacher=teacher)
    history = adapter.manifest.provenance["losses"]
    assert history[-1]["decision"] < history[0]["decision"]
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in weights.items())  # the base is restored


def test_unknown_teacher_target_is_refused(tiny_model, tokenizer, rollouts, teacher):
    with pytest.raises(ValueError, match="unknown teacher target"):
        fit(tiny_model, tokenizer, rollouts, FitArgs(teacher_target="soft"), progress=False, teacher=teacher)


def test_fit_teacher_cli_writes_a_distilled_adapter_and_refuses_another_vocabulary(tiny_model, tokenizer, teacher,
                                                                                   tmp_path):
    import json
    import subprocess
    import sys

    from conftest import make_tokenizer

    folders = {}
    stranger_tok = make_tokenizer(vocab_size=330)
    for name, model, tok in (("base", tiny_model, tokenizer), ("teacher", teacher, tokenizer),
                             ("stranger", make_model(stranger_tok, seed=4), stranger_tok)):
        folders[name] = tmp_path / name
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                for q, a in (("What is 2+3?", "5"), ("What is 4+4?", "8"), ("What is 1+2?", "3"))))
    cli = [sys.executable, "-m", "reasonmaxxer.cli"]
    made = subprocess.run([*cli, "rollouts", "--model", str(folders["base"]), "--problems", str(problems),
                           "--samples", "2", "--max-tokens", "12", "--out", str(tmp_path / "r.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    fit_cmd = [*cli, "fit", "--model", str(folders["base"]), "--rollouts", str(tmp_path / "r.jsonl"), "--dtype",
               "float32", "--target-fire-rate", "0.3", "--epochs", "2", "--accumulation", "2", "--warmup", "1"]
    done = subprocess.run([*fit_cmd, "--teacher", str(folders["teacher"]), "--out", str(tmp_path / "ad")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert manifest["provenance"]["teacher"] == str(folders["teacher"])
    assert manifest["provenance"]["data"]["sequences"] == 6  # no mixed problem needed
    refused = subprocess.run([*fit_cmd, "--teacher", str(folders["stranger"]), "--out", str(tmp_path / "no")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "cannot teach this model" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "no").exists()
