"""The branch probe on the tiny model: forced tokens sit where they were forced, positions follow the seed,
records resume and round-trip, and the summary reads them."""

import json
import random

import pytest
import torch

from reasonmaxxer.clients.probe_report import markdown, summarize, write_summary
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.training.probe import ProbeConfig, pick_answers, pick_positions, plan, run_probe

from conftest import sampled_records

GREEDY = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 24, "stop": []}


@pytest.fixture(scope="module")
def records(tiny_model, tokenizer, prompts):
    rs = sampled_records(tiny_model, tokenizer, prompts, max_tokens=14, seed_base=700)
    for r in rs:
        r.update(gold="5", truncated=False, row=int(r["problem_id"][1:]))
    return rs


def _parity(text: str, gold: str, truncated: bool) -> float:
    return float(len(text) % 2 == 0)  # a stand-in verifier: the tiny model's text has no answers


def test_answers_and_positions_follow_the_seed(records):
    a = pick_answers(records, wrong=3, right=3, per_problem=1, seed=1)
    assert [r["reward"] for r in a].count(0.0) == 3 and len({(r["problem_id"], r["reward"]) for r in a}) == 6
    assert [r["reward"] > 0 for r in a] == [False, True] * 3  # alternating kinds
    assert a == pick_answers(records, 3, 3, 1, seed=1) and a != pick_answers(records, 3, 3, 1, seed=2)
    with pytest.raises(ValueError, match="too few finished answers"):
        pick_answers(records, wrong=9, right=1, per_problem=2, seed=0)
    h = torch.tensor([0.1, 2.0, 0.2, 3.0, 2.5, 0.3, 1.9, 4.0])  # the last index is never a branch point
    d1, r1 = pick_positions(h, 1.8, 2, random.Random(5))
    assert set(d1) <= {1, 3, 4, 6} and len(d1) == 2 and len(r1) == 2 and 7 not in r1
    assert (d1, r1) == pick_positions(h, 1.8, 2, random.Random(5))
    assert {tuple(pick_positions(h, 1.8, 2, random.Random(s))[1]) for s in range(20)} != {tuple(r1)}
    assert pick_positions(h, 5.0, 2, random.Random(5)) == ([], [])  # no decision point: no random one either


def test_continuations_carry_the_forced_token_and_resume(tiny_model, tokenizer, records, tmp_path):
    config = ProbeConfig(tau=2.0, positions=2, alternatives=2, continuations=1, seed=3, concurrency=5)
    answers, points = plan(tiny_model, records, config, wrong=2, right=2, per_problem=1, progress=False)
    assert {p.kind for p in points} == {"decision", "random"}
    assert all(p.entropy > 2.0 for p in points if p.kind == "decision")
    for group in {(p.answer, p.kind, p.position) for p in points}:
        cands = [p for p in points if (p.answer, p.kind, p.position) == group]
        assert [p.sampled for p in cands] == [True, False, False]  # the sampled token, then 2 alternatives
        assert cands[0].candidate == answers[group[0]]["completion_ids"][group[2]]
        assert len({p.candidate for p in cands}) == 3 and all(p.rank >= 1 for p in cands[1:])
    out = tmp_path / "branches.jsonl"
    added = run_probe(Engine(tiny_model, tokenizer), answers, points, GREEDY, config, _parity, out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert added == len(points) == len(rows)
    for r in rows:
        answer = next(a for a in answers if (a["problem_id"], a["sample"]) == (r["problem_id"], r["sample"]))
        forced = [*answer["completion_ids"][: r["position"]], r["candidate"]]
        ids = answer["prompt_ids"] + forced + r["continuation_ids"]
        n = len(r["continuation_ids"])
        assert len(ids) - len(answer["prompt_ids"]) <= GREEDY["max_new_tokens"]  # the answer's budget is kept
        with torch.no_grad():  # greedy: each continuation token is the argmax after the forced prefix
            argmax = tiny_model(input_ids=torch.tensor([ids])).logits[0, -n - 1 : -1].argmax(-1).tolist()
        assert argmax == r["continuation_ids"]
        if r["sampled"] and r["kind"] == "decision":  # re-decoding the sampled token greedily is the greedy rest
            assert r["candidate"] == answer["completion_ids"][r["position"]]
    assert run_probe(Engine(tiny_model, tokenizer), answers, points, GREEDY, config, _parity, out, progress=False) == 0
    summary = write_summary(out)
    assert summary["continuations"] == len(rows)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert "| decision |" in markdown(summary) and (tmp_path / "summary.md").exists()


def test_the_summary_counts_fixes_breaks_and_wins_on_hand_made_records():
    def rec(pid, original, kind, position, cand, sampled, reward, k=0):
        return {"problem_id": pid, "sample": 0, "original_reward": original, "kind": kind, "position": position,
                "candidate": cand, "sampled": sampled, "reward": reward, "k": k}

    rows = [
        # wrong answer p1: at its decision point an alternative fixes it, resampling does not
        rec("p1", 0.0, "decision", 4, 10, True, 0.0), rec("p1", 0.0, "decision", 4, 11, False, 1.0),
        rec("p1", 0.0, "decision", 4, 12, False, 0.0),
        rec("p1", 0.0, "random", 2, 20, True, 0.0), rec("p1", 0.0, "random", 2, 21, False, 0.0),
        # right answer p2: an alternative at the decision point breaks it; random changes nothing
        rec("p2", 1.0, "decision", 3, 30, True, 1.0), rec("p2", 1.0, "decision", 3, 31, False, 0.0),
        rec("p2", 1.0, "random", 5, 40, True, 1.0), rec("p2", 1.0, "random", 5, 41, False, 1.0),
    ]
    s = summarize(rows)
    d, r = s["kinds"]["decision"], s["kinds"]["random"]
    assert d["fix_alt"]["mean"] == 0.5 and d["fix_resample"]["mean"] == 0.0 and r["fix_alt"]["mean"] == 0.0
    assert d["break_alt"]["mean"] == 1.0 and r["break_alt"]["mean"] == 0.0 and d["break_resample"]["mean"] == 0.0
    assert d["answers_fixed"] == 1.0 and r["answers_fixed"] == 0.0
    assert d["points"] == 2 and d["best_alt_beats_sampled"] == 0.5 and d["worse"] == 0.5
    assert d["oracle_gain"]["mean"] == 0.5 and r["ties"] == 1.0
    assert s["decision_minus_random"]["fix_alt"]["diff"] == 0.5
    assert s["decision_minus_random"]["break_alt"]["diff"] == 1.0


def test_probe_branches_from_the_command_line(tiny_model, tokenizer, tmp_path, capsys):
    """The CLI end to end on the tiny model (transformers backend): rollouts, then the probe and its summary;
    a folder of other settings is refused. Stop strings make the tiny model's answers finish."""
    from reasonmaxxer.cli import main

    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"q": f"What is {i} + 2?", "a": str(i + 2)}) + "\n" for i in range(2)))
    rollouts = tmp_path / "r.jsonl"
    assert main(["rollouts", "--model", str(folder), "--problems", str(problems), "--question-field", "q",
                 "--answer-field", "a", "--samples", "3", "--max-new-tokens", "12", "--stop", " ", "--stop", "i",
                 "--out", str(rollouts)]) == 0
    probe = ["probe-branches", "--model", str(folder), "--rollouts", str(rollouts), "--backend", "transformers",
             "--wrong", "2", "--right", "0", "--tau", "0.5", "--positions", "1", "--alternatives", "1",
             "--continuations", "1", "--out", str(tmp_path / "probe")]
    capsys.readouterr()
    assert main(probe) == 0
    assert "| decision |" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "probe" / "branches.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2 and {r["kind"] for r in rows} == {"decision", "random"}  # answers x kinds x cands
    assert (tmp_path / "probe" / "summary.md").exists()
    assert main([*probe[:-2], "--seed", "9", "--out", str(tmp_path / "probe")]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*probe[:-2], "--wrong", "50", "--out", str(tmp_path / "p2")]) == 2
    assert "too few finished answers" in capsys.readouterr().err
