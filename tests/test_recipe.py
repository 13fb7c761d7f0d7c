"""The paper's recipe, piece by piece: selection tie-breaks, the trim, the curriculum, the schedule, the
recipe preset, checkpoint and tau selection on validation, and the guard on evaluation rows."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from reasonmaxxer.training import loop
from reasonmaxxer.training.fit import FitArgs, TrainItem, fit, select_problems, trim_shortest
from reasonmaxxer.training.problems import ProblemError, check_not_evaluation, load_problems
from reasonmaxxer.training.recipe import PAPER_FIT, recipe

from conftest import sampled_records

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rec(pid, sample, reward, length, truncated=False):
    return {"problem_id": pid, "sample": sample, "reward": float(reward), "completion_ids": [7] * length,
            "truncated": truncated}


def test_selection_breaks_ties_by_truncations_then_length_then_id():
    pool = [
        # a, b, c, d all at pass rate 0.5; e at 0.25; f is not mixed
        *[_rec("a", k, k % 2, 10, truncated=k == 0) for k in range(4)],  # 1 truncated
        *[_rec("b", k, k % 2, 30) for k in range(4)],  # no truncation, long
        *[_rec("c", k, k % 2, 20) for k in range(4)],  # no truncation, shorter
        *[_rec("d", k, k % 2, 20) for k in range(4)],  # ties c on everything but the id
        *[_rec("e", k, k == 0, 5) for k in range(4)],
        *[_rec("f", k, 1, 5) for k in range(4)],
    ]
    order = [r["problem_id"] for r in select_problems(pool, 6)][::4]
    assert order == ["c", "d", "b", "a", "e"]
    assert [r["problem_id"] for r in select_problems(pool, 2)][::4] == ["c", "d"]


def test_the_trim_keeps_exactly_the_globally_shortest_fraction():
    lengths = [9, 3, 7, 1, 5, 8, 2, 6, 4, 10]
    records = [_rec(f"p{i % 3}", i, i % 2, n) for i, n in enumerate(lengths)]
    kept = trim_shortest(records, 0.8)
    assert len(kept) == 8 and sorted(len(r["completion_ids"]) for r in kept) == list(range(1, 9))
    assert trim_shortest(records, 1.0) == records
    # Ties at the cut: untruncated first, then problem id, then sample (the released sort key).
    tied = [_rec("b", 0, 0, 5, truncated=True), _rec("b", 1, 1, 5), _rec("a", 2, 1, 5), _rec("a", 1, 0, 1)]
    assert [(r["problem_id"], r["sample"]) for r in trim_shortest(tied, 0.5)] == [("a", 1), ("a", 2)]
    with pytest.raises(ValueError, match="fraction in"):
        trim_shortest(records, 0.0)


def _item(pid, sample, advantage, decisions, completion):
    prompt_len = 3
    decision = torch.zeros(prompt_len - 1 + completion, dtype=torch.bool)
    decision[prompt_len - 1 : prompt_len - 1 + decisions] = True
    scored = type("S", (), {"entropy": torch.zeros(decision.numel()), "prompt_len": prompt_len})()
    return TrainItem(scored, decision, ~decision, advantage, [], pid, sample)


def test_the_curriculum_orders_by_advantage_times_decision_density():
    items = [
        _item("a", 0, 0.5, 2, 10),   # clarity 0.10
        _item("b", 0, -2.0, 1, 10),  # 0.20
        _item("c", 0, 1.0, 2, 10),   # 0.20, |A| 1 < 2: after b
        _item("d", 0, 0.0, 5, 10),   # 0
        _item("e", 1, 1.0, 4, 20),   # 0.20, |A| 1, 4 decision points > c's 2: before c
        _item("e", 0, 1.0, 4, 20),   # ties e#1 on everything but the sample
    ]
    args = FitArgs(order="curriculum", epochs=2)
    order = loop.train_order(items, args)
    names = [f"{items[i].problem_id}{items[i].sample}" for i in order]
    assert names[:6] == ["b0", "e0", "e1", "c0", "a0", "d0"] and names[6:] == names[:6]
    shuffled = loop.train_order(items, FitArgs(order="shuffle", epochs=2, seed=3))
    assert sorted(shuffled) == sorted(order) and shuffled != order


def test_the_paper_schedule_is_sized_for_two_epochs_and_stopped_at_149():
    args = FitArgs(epochs=2, accumulation=8, warmup=50, warmup_cap=False, max_steps=149, checkpoint_every=0.15)
    assert loop.schedule_steps(800, args) == (200, 149, 50)
    assert loop.checkpoint_steps(800, args) == {15 * j for j in range(1, 10)} | {149}
    # Ours: warm-up capped at a third of the steps; evenly spaced checkpoints, the last one last.
    ours = FitArgs(epochs=1, accumulation=8, warmup=50, checkpoints=2)
    assert loop.schedule_steps(400, ours) == (50, 50, 16)
    assert loop.checkpoint_steps(400, ours) == {25, 50}


def test_the_recipe_fills_what_was_not_given_and_given_flags_win():
    from reasonmaxxer.cli import build_parser
    from reasonmaxxer.training.cli_config import RolloutsConfig

    parse = build_parser("rollouts").parse_args
    paper = RolloutsConfig.from_args(parse(["rollouts", "--problems", "p", "--out", "o", "--recipe", "paper",
                                            "--top-p", "0.9"])).sampling
    assert (paper.samples, paper.prompt_style, paper.top_p, paper.max_new_tokens) == (20, "paper", 0.9, 384)
    plain = RolloutsConfig.from_args(parse(["rollouts", "--problems", "p", "--out", "o"])).sampling
    assert (plain.samples, plain.prompt_style) == (20, "auto")
    assert PAPER_FIT["threshold"] == 1.4 and PAPER_FIT["max_steps"] == 149
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("rl")


def test_fit_args_from_the_cli_follow_the_recipe():
    from reasonmaxxer.cli import build_parser
    from reasonmaxxer.training.cli_config import FitConfig

    parse = build_parser().parse_args
    paper = FitConfig.from_args(parse(["fit", "--out", "x", "--rollouts", "r", "--recipe", "paper", "--lr",
                                       "3e-4"])).fit
    assert (paper.threshold, paper.trim, paper.order, paper.max_steps, paper.warmup_cap) == (1.4, 0.8, "curriculum",
                                                                                            149, False)
    assert paper.lr == 3e-4 and paper.autocast == "bfloat16" and paper.checkpoint_every == 0.15
    calibrated = FitConfig.from_args(parse(["fit", "--out", "x", "--rollouts", "r", "--recipe", "paper",
                                            "--threshold", "calibrate", "--warmup-cap", "true"])).fit
    assert calibrated.threshold is None and calibrated.warmup_cap is True
    assert FitConfig.from_args(parse(["fit", "--out", "x", "--rollouts", "r"])).fit == FitArgs(name="x")  # its --out


@pytest.fixture(scope="module")
def rollouts(tiny_model, tokenizer, prompts):
    return sampled_records(tiny_model, tokenizer, prompts, max_tokens=12, seed_base=500)


def test_checkpoint_selection_returns_the_best_validation_checkpoint(tiny_model, tokenizer, rollouts):
    scores = {2: 0.3, 4: 0.5, 6: 0.4, 8: 0.1}
    seen = {}

    def validate(step, adapter):
        seen[step] = adapter.B.clone()
        return scores[step]

    args = FitArgs(kind="head", name="ck", target_fire_rate=0.2, rank=4, lr=3e-3, epochs=1, accumulation=2,
                   warmup=1, checkpoint_every=0.25)  # 16 rollouts / 2 = 8 steps, a checkpoint every 2
    adapter, report = fit(tiny_model, tokenizer, rollouts, args, callback=validate, progress=False)
    assert sorted(seen) == [2, 4, 6, 8]
    assert report["chosen_checkpoint"] == {"step": 4, "value": 0.5}
    assert torch.equal(adapter.B, seen[4]) and not torch.equal(adapter.B, seen[8])


def test_a_tau_sweep_refits_per_tau_from_cached_scores_without_a_forward_pass(tiny_model, tokenizer, rollouts,
                                                                             tmp_path):
    args = FitArgs(kind="head", name="sw", rank=4, lr=3e-3, epochs=2, accumulation=2, warmup=1)
    fit(tiny_model, tokenizer, rollouts, args, progress=False, score_cache=tmp_path)  # warms the cache
    forwards = []
    hook = tiny_model.register_forward_pre_hook(lambda *a: forwards.append(1))
    taus_seen = []

    def validate(step, adapter):
        taus_seen.append(adapter.manifest.gate.tau)
        return {2.0: 0.2, 2.5: 0.6, 3.0: 0.4}[adapter.manifest.gate.tau]

    try:
        adapter, _report = fit(tiny_model, tokenizer, rollouts, args, callback=validate, progress=False,
                              score_cache=tmp_path, tau_sweep=[2.0, 2.5, 3.0])
    finally:
        hook.remove()
    assert forwards == [] and taus_seen == [2.0, 2.5, 3.0]
    assert adapter.manifest.gate.tau == 2.5 and adapter.manifest.gate.target_fire_rate is None
    sweep = adapter.manifest.metrics["tau_sweep"]
    assert [s["tau"] for s in sweep] == [2.0, 2.5, 3.0]
    assert [s["chosen_checkpoint"]["value"] for s in sweep] == [0.2, 0.6, 0.4]
    assert sweep[0]["fire_rate"] > sweep[1]["fire_rate"] > sweep[2]["fire_rate"]
    with pytest.raises(ValueError, match="validation split"):
        fit(tiny_model, tokenizer, rollouts, args, progress=False, score_cache=tmp_path, tau_sweep=[2.0])


def test_a_stopped_sweep_continues_from_its_last_checkpoint_to_the_uninterrupted_adapter(tiny_model, tokenizer,
                                                                                       rollouts, tmp_path):
    """With a checkpoint folder, a tau sweep stopped midway (here: during the second tau's third validation)
    continues from the last saved training state: the checkpoints before it are not trained or validated again, and
    the adapter, losses and sweep equal an uninterrupted fit's; a folder of other settings is refused."""
    args = FitArgs(kind="head", name="cp", rank=4, lr=3e-3, epochs=2, accumulation=2, warmup=1, checkpoints=4)
    kw = dict(progress=False, score_cache=tmp_path / "scores", tau_sweep=[2.0, 2.5])

    def value(step, adapter):  # a validation value that depends on the adapter: the best checkpoint varies
        return float(adapter.B.abs().sum() % 1.0)

    calls = []
    whole, _ = fit(tiny_model, tokenizer, rollouts, args, callback=lambda s, a: calls.append((a.manifest.gate.tau, s))
                   or value(s, a), **kw)
    assert len(calls) == 8  # 4 checkpoints x 2 taus

    def stop_at(n):
        seen = []

        def callback(step, adapter):
            seen.append((adapter.manifest.gate.tau, step))
            if len(seen) == n:
                raise KeyboardInterrupt
            return value(step, adapter)
        return callback

    folder = tmp_path / "checkpoints"
    callback = stop_at(7)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model, tokenizer, rollouts, args, callback=callback, checkpoint_dir=folder, **kw)
    assert sorted(p.name for p in folder.iterdir()) == ["tau-2.5.pt", "tau-2.pt"]
    again = []
    resumed, _ = fit(tiny_model, tokenizer, rollouts, args, callback=lambda s, a: again.append((a.manifest.gate.tau, s))
                     or value(s, a), checkpoint_dir=folder, **kw)
    assert again == calls[6:]  # the first tau and two of the second's checkpoints come from the folder
    assert torch.equal(resumed.A, whole.A) and torch.equal(resumed.B, whole.B)
    assert resumed.manifest.metrics["tau_sweep"] == whole.manifest.metrics["tau_sweep"]
    assert resumed.manifest.provenance["losses"] == whole.manifest.provenance["losses"]
    with pytest.raises(ValueError, match=r"tau-2.pt holds a run with other settings \(args differ\)"):
        fit(tiny_model, tokenizer, rollouts, replace(args, lr=1e-3), callback=value, checkpoint_dir=folder, **kw)


def test_validation_results_in_the_checkpoint_folder_are_not_evaluated_again(tiny_model, tokenizer, tmp_path,
                                                                             monkeypatch):
    """fit's validation keeps the base's result and each checkpoint's in --checkpoint-dir: a rerun of the same
    validation evaluates neither again; another validation (more samples) starts its own."""
    from reasonmaxxer.cli import build_parser
    from reasonmaxxer.steering.adapters import HeadAdapter
    from reasonmaxxer.training import fit_cli, rollouts
    from reasonmaxxer.training.cli_config import FitConfig

    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3)))
    evaluated = []
    real = rollouts.evaluate
    monkeypatch.setattr(rollouts, "evaluate", lambda *a, **k: evaluated.append(k.get("steering", a[4] if len(a) > 4
                                                                                    else None)) or real(*a, **k))

    def validation(*extra):
        argv = ["fit", "--rollouts", "r.jsonl", "--out", str(tmp_path / "x"), "--val-problems", str(val),
                "--val-samples", "1", "--max-new-tokens", "4", "--checkpoint-dir", str(tmp_path / "cp"), *extra]
        config = FitConfig.from_args(build_parser("fit").parse_args(argv))
        return fit_cli._validation(config, config.val.load(), tiny_model, tokenizer)

    adapter = HeadAdapter.create(tiny_model, tokenizer, "cp", rank=4, tau=0.5, seed=1)
    callback, report, _ = validation()
    first = callback(3, adapter)
    assert len(evaluated) == 2 and [c["step"] for c in report["checkpoints"]] == [3]
    evaluated.clear()
    callback, again, _ = validation()
    assert evaluated == [] and again["base"] == report["base"] and again["checkpoints"] == report["checkpoints"]
    assert callback(3, adapter) == first and evaluated == []  # evaluated before the stop: taken from the folder
    callback(6, adapter)
    assert len(evaluated) == 1 and [c["step"] for c in again["checkpoints"]] == [3, 6]
    evaluated.clear()
    validation("--val-samples", "2")
    assert len(evaluated) == 1  # another validation: its own base


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_validation_and_training_never_read_evaluation_rows():
    with pytest.raises(ProblemError, match=r"evaluation set \(gsm8k/test.jsonl"):
        check_not_evaluation(load_problems(DATA / "gsm8k" / "test.jsonl", offset=900, limit=60).selection, "val")
    with pytest.raises(ProblemError, match=r"svamp/test\.jsonl rows 400-699, e\.g\. row 400"):
        check_not_evaluation(load_problems(DATA / "svamp" / "test.jsonl", offset=390, limit=20).selection, "val")
    check_not_evaluation(load_problems(DATA / "svamp" / "test.jsonl", offset=0, limit=400).selection, "val")
    check_not_evaluation(load_problems(DATA / "gsm8k" / "train.jsonl", offset=1000, limit=60).selection, "val")


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_fit_refuses_an_evaluation_validation_split_before_loading_a_model(tmp_path):
    rollouts = tmp_path / "r.jsonl"
    meta = {"model": {"name": "m", "fingerprint": "x"}, "sampling": {},
            "problems": load_problems(DATA / "gsm8k" / "train.jsonl", limit=3).selection}
    rollouts.write_text(json.dumps({"meta": meta}) + "\n")
    cli = [sys.executable, "-m", "reasonmaxxer.cli", "fit", "--model", "no-such-model", "--rollouts", str(rollouts),
           "--out", str(tmp_path / "ad")]
    cases = [
        (["--val-problems", str(DATA / "gsm8k" / "test.jsonl"), "--val-limit", "60"], "evaluation set"),
        (["--val-problems", str(DATA / "gsm8k" / "train.jsonl"), "--val-limit", "5"], "share 3 rows"),
        (["--tau-sweep", "1.0,1.4"], "--tau-sweep keeps the tau"),
    ]
    for extra, message in cases:
        out = subprocess.run([*cli, *extra], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and message in out.stderr, (extra, out.stderr[-1500:])


def test_a_lora_fit_with_the_paper_settings_runs_in_bf16_autocast(tiny_model, tokenizer, rollouts):
    import copy

    model = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = FitArgs(kind="lora", name="p-lora", threshold=2.5, rank=4, lora_alpha=8, lr=1e-3, epochs=2,
                   accumulation=4, warmup=2, warmup_cap=False, max_steps=5, checkpoint_every=0.5,
                   order="curriculum", trim=0.75, autocast="bfloat16")
    seen = []
    _adapter, report = fit(model, tokenizer, rollouts, args, callback=lambda s, a: seen.append(s) or float(s == 4),
                          progress=False)
    assert seen == [2, 4, 5] and report["chosen_checkpoint"] == {"step": 4, "value": 1.0} and report["steps"] == 5
    assert report["data"]["sequences"] == 12 and report["data"]["trimmed_to"] == 12  # 16 rollouts x 0.75
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="--autocast"):
        fit(copy.deepcopy(tiny_model), tokenizer, rollouts, FitArgs(kind="lora", autocast="fp8", threshold=2.5),
            progress=False)
