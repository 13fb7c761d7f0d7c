"""Rollouts: file format, summary, resume without duplicates or losses, refusal of a mismatched resume."""

import json

import pytest

from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.training.problems import load_problems
from reasonmaxxer.training.rollouts import RolloutConfig, load_rollouts, run_rollouts, summarize

QUESTIONS = [("What is 2+3?", "5"), ("What is 7*6?", "42"), ("Halve 18.", "9"), ("What is 10-4?", "6")]


@pytest.fixture()
def problem_file(tmp_path):
    path = tmp_path / "easy.jsonl"
    path.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in QUESTIONS))
    return path


def _score(text, gold, truncated):
    return float(not truncated and len(text) % 2 == 0)  # deterministic, mixed outcomes


def _config(**kw):
    return RolloutConfig(**{"samples": 3, "max_new_tokens": 6, "temperature": 1.0, "concurrency": 5, **kw})


def _run(tiny_model, tokenizer, problem_file, out, score=_score, **kw):
    problems = load_problems(str(problem_file), question_field="q", answer_field="a")
    return run_rollouts(Engine(tiny_model, tokenizer), problems, _config(**kw), out, score, progress=False)


def test_rollout_file_and_summary(tiny_model, tokenizer, problem_file, tmp_path):
    summary = _run(tiny_model, tokenizer, problem_file, tmp_path / "r.jsonl")
    meta, records = load_rollouts(tmp_path / "r.jsonl")
    assert meta["sampling"]["samples"] == 3 and meta["problems"]["count"] == 4
    assert len(records) == 12
    assert sorted((r["row"], r["sample"]) for r in records) == [(i, k) for i in range(4) for k in range(3)]
    for r in records:
        assert r["prompt_ids"] and len(r["completion_ids"]) <= 6
        assert r["text"] == tokenizer.decode(r["completion_ids"], skip_special_tokens=True)
        assert r["reward"] == _score(r["text"], r["gold"], r["truncated"])
    assert summary == summarize(records)
    assert summary["rollouts"] == 12 and summary["problems"] == 4


def test_interrupted_run_resumes_without_duplicates_or_losses(tiny_model, tokenizer, problem_file, tmp_path):
    whole = tmp_path / "whole.jsonl"
    _run(tiny_model, tokenizer, problem_file, whole)
    calls = {"n": 0}

    def dying(text, gold, truncated):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return _score(text, gold, truncated)

    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, tokenizer, problem_file, part, score=dying)
    assert len(load_rollouts(part)[1]) == 5
    with part.open("a") as f:
        f.write('{"problem_id": "torn')  # a write cut by the interruption
    _run(tiny_model, tokenizer, problem_file, part)
    records = load_rollouts(part)[1]
    assert len(records) == 12
    assert len({(r["problem_id"], r["sample"]) for r in records}) == 12
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    expected = {key(r): r["completion_ids"] for r in load_rollouts(whole)[1]}
    assert {key(r): r["completion_ids"] for r in records} == expected


def test_resume_with_other_settings_is_refused(tiny_model, tokenizer, problem_file, tmp_path):
    out = tmp_path / "r.jsonl"
    _run(tiny_model, tokenizer, problem_file, out)
    with pytest.raises(ValueError, match="sampling settings differ"):
        _run(tiny_model, tokenizer, problem_file, out, temperature=0.5)


def test_missing_rollout_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `reasonmaxxer rollouts` first"):
        load_rollouts(tmp_path / "none.jsonl")


def test_a_complete_run_is_known_without_an_engine_and_paper_stops_are_recorded(tiny_model, tokenizer, problem_file,
                                                                                 tmp_path):
    from reasonmaxxer.training.rollouts import completed

    out = tmp_path / "r.jsonl"
    problems = load_problems(str(problem_file), question_field="q", answer_field="a")
    assert completed(out, problems, _config(), tokenizer) is None  # nothing yet
    summary = _run(tiny_model, tokenizer, problem_file, out, prompt_style="paper")
    assert load_rollouts(out)[0]["sampling"]["stop"] == ["Human:", "Assistant:"]  # the released stops
    assert completed(out, problems, _config(prompt_style="paper"), tokenizer) == summary
    assert completed(out, problems, _config(prompt_style="paper", samples=4), tokenizer) is None  # more to do
    assert completed(out, problems, _config(prompt_style="paper", temperature=0.5), tokenizer) is None  # another run
    assert completed(out, problems, _config(prompt_style="paper", stop=("x",)), tokenizer) is None
