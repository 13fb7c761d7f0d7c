"""`reasonmaxxer ab` against a live server on a tiny model: every arm, a stable schema, a self-contained
report, resume without duplicates or losses, and clear errors that write nothing."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
from test_server import serving_tiny

from reasonmaxxer.cli import main
from reasonmaxxer.clients import ab as ab_module

SCHEMA = json.loads((Path(ab_module.__file__).parent / "ab.schema.json").read_text())


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer):
    yield from serving_tiny(tiny_model, tokenizer)


@pytest.fixture()
def problems(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"q": f"What is {i} + 1?", "a": str(i + 1)}) + "\n" for i in range(4)))
    return path


def _args(url, problems, out, *extra):
    return ["ab", "--url", url, "--problems", str(problems), "--question-field", "q", "--answer-field", "a",
            "--samples", "2", "--max-tokens", "8",
            "--arms", "base,tiny-head:gated,tiny-head:always,tiny-head:random@0.5",
            "--thresholds", "2.5", "--verifier-fallbacks", "boxed,last_number", "--out", str(out), *extra]


def test_ab_run_writes_every_arm_a_valid_json_and_a_self_contained_report(url, problems, tmp_path):
    out = tmp_path / "ab"
    assert main(_args(url, problems, out)) == 0
    summary = json.loads((out / "ab.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    assert list(summary["arms"]) == ["base", "tiny-head:gated", "tiny-head:gated@2.5", "tiny-head:always",
                                     "tiny-head:random@0.5"]
    for name, arm in summary["arms"].items():
        assert arm["n"] == 8
        if name != "base":
            assert arm["vs_base"]["pairs"] == 8
    assert summary["arms"]["tiny-head:always"]["fire_rate_mean"] == 1.0
    assert summary["arms"]["base"]["fire_rate_mean"] == 0.0
    assert 0.2 < summary["arms"]["tiny-head:random@0.5"]["fire_rate_mean"] < 0.8  # the random control's coin
    fired = [d for d in summary["disagreements"] if d["arm_fired_at"]]
    html = (out / "report.html").read_text()
    assert not summary["disagreements"] or all(d["arm_pieces"] for d in summary["disagreements"])
    assert "<mark" in html or not fired  # fired tokens are highlighted in the disagreement panel
    assert "<svg" in html and "tiny-head:gated@2.5" in html
    assert not re.search(r"(src|href)\s*=|https?://|@import", html)


def test_interrupted_ab_resumes_without_duplicates_or_losses(url, problems, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ab"
    real = ab_module.run_ab
    calls = {"n": 0}

    def dying_score_run(client, model, problems_, arms, config, out_dir, score, progress=True):
        def score_then_die(text, gold, truncated):
            calls["n"] += 1
            if calls["n"] > 10:
                raise KeyboardInterrupt
            return score(text, gold, truncated)

        return real(client, model, problems_, arms, config, out_dir, score_then_die, progress)

    monkeypatch.setattr(ab_module, "run_ab", dying_score_run)
    assert main(_args(url, problems, out, "--concurrency", "1")) == 130  # Ctrl-C: one line, exit 130
    monkeypatch.setattr(ab_module, "run_ab", real)
    partial = (out / "samples.jsonl").read_text().splitlines()
    assert len(partial) == 10
    assert main(["ab-report", str(out)]) == 0  # the interrupted run, reported on what every arm has
    summary = json.loads((out / "ab.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    assert {a["n"] for a in summary["arms"].values()} == {2}  # problem 0, samples 0 and 1, all 5 arms
    capsys.readouterr()
    assert main(["ab-report", "--markdown", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| arm | n | pass@1") and len(table) == 2 + 5 and "| base | 2 |" in table[2]
    assert main(_args(url, problems, out)) == 0
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    keys = [(r["arm"], r["problem_id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == 5 * 4 * 2  # arms x problems x samples
    assert [json.loads(x) for x in partial] == rows[:10]


@pytest.mark.parametrize("case", ["url", "adapter", "fields"])
def test_bad_input_fails_clearly_and_writes_nothing(url, problems, tmp_path, capsys, case):
    out = tmp_path / "ab"
    args = _args(url, problems, out)
    if case == "url":
        args[args.index("--url") + 1] = "http://127.0.0.1:9"
        message = "cannot reach a server"
    elif case == "adapter":
        args[args.index("--arms") + 1] = "base,nope:gated"
        message = "does not serve adapter(s) ['nope']"
    else:
        args[args.index("--question-field") + 1] = "question"
        message = "question"
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_report_marks_the_tokens_where_the_gate_fired():
    from reasonmaxxer.clients.report import _marked

    d = {"arm_text": "x = <5>", "arm_pieces": ["x", " =", " <5>"], "arm_fired_at": [2]}
    assert _marked(d) == "x =<mark title='gate fired'> &lt;5&gt;</mark>"
    assert _marked({"arm_text": "<plain>", "arm_pieces": None}) == "&lt;plain&gt;"


def test_arms_parse_thresholds_and_rates_and_refuse_the_rest():
    arms = ab_module.parse_arms("base,h:gated@1.2,h:gated,h:always,h:random@0.1,h:random", thresholds=[1.8])
    assert [(a.name, a.mode, a.threshold, a.rate) for a in arms] == [
        ("base", "off", None, None), ("h:gated@1.2", "gated", 1.2, None), ("h:gated", "gated", None, None),
        ("h:gated@1.8", "gated", 1.8, None), ("h:always", "always", None, None),
        ("h:random@0.1", "random", None, 0.1), ("h:random", "random", None, None)]
    for bad, message in [("h:always@1", "ADAPTER:always"), ("h:gated@x", "threshold"),
                         ("h:random@2", "[0, 1]"), ("h:gated@1,h:gated@1.0", "repeat"), ("h:sometimes", "gated")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            ab_module.parse_arms(bad)


def test_ab_report_needs_an_ab_folder(tmp_path, capsys):
    assert main(["ab-report", str(tmp_path)]) == 2
    assert "meta.json" in capsys.readouterr().err


def test_a_folder_pools_paired_samples_across_runs_with_other_arms(url, problems, tmp_path, capsys):
    out = tmp_path / "ab"
    args = _args(url, problems, out)
    arms = args.index("--arms") + 1
    args[arms] = "base,tiny-head:gated"
    assert main(args) == 0
    before = (out / "samples.jsonl").read_text()
    args[arms] = "base,tiny-head:gated,tiny-head:always"
    assert main(args) == 0
    after = (out / "samples.jsonl").read_text()
    assert after.startswith(before)  # nothing redone
    rows = [json.loads(x) for x in after.splitlines()]
    assert sorted({r["arm"] for r in rows[len(before.splitlines()):]}) == ["tiny-head:always"]
    summary = json.loads((out / "ab.json").read_text())
    assert summary["arms"]["tiny-head:always"]["vs_base"]["pairs"] == 8
    args[arms] = "base,tiny-head:random@0.5"  # leaving an arm out keeps its samples
    assert main(args) == 0
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 8 and json.loads((out / "ab.json").read_text())["arms"].keys() == {
        "base", "tiny-head:random@0.5"}
    meta = json.loads((out / "meta.json").read_text())
    assert [a["name"] for a in meta["arms"]] == ["base", "tiny-head:gated", "tiny-head:gated@2.5",
                                                 "tiny-head:always", "tiny-head:random@0.5"]
    capsys.readouterr()
    assert main(["ab-report", "--markdown", "--arms", "base,tiny-head:always", str(out)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2 + 2
    assert main(["ab-report", "--arms", "base,nope", str(out)]) == 2
    written = (out / "ab.json").read_text()
    capsys.readouterr()
    assert main(["ab-report", "--reference", "tiny-head:always", "--markdown", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + 4 and "vs tiny-head:always" in table[0]  # every other arm against it, base too
    assert sorted(r.split(" | ")[0].strip("| ") for r in table[2:]) == [
        "base", "tiny-head:gated", "tiny-head:gated@2.5", "tiny-head:random@0.5"]
    assert (out / "ab.json").read_text() == written  # a comparison writes nothing
    assert main(["ab-report", "--reference", "nope", str(out)]) == 2
    assert "no arm 'nope'" in capsys.readouterr().err
    args[args.index("--max-tokens") + 1] = "9"  # other sampling settings: another run
    assert main(args) == 2
    assert "other sampling settings" in capsys.readouterr().err


def test_the_failure_taxonomy_on_hand_made_answers():
    from reasonmaxxer.clients.ab import failure_kind, failure_shares

    assert failure_kind("so it is \\boxed{4}", 1.0, False) is None
    assert failure_kind("so it is \\boxed{5}", 0.0, False) == "wrong_boxed"
    assert failure_kind("the answer is 5", 0.0, False) == "wrong_unboxed"
    assert failure_kind("\\boxed{5} and then on and on", 0.0, True) == "truncated"  # truncation wins
    rows = [{"text": t, "reward": r, "finish_reason": f} for t, r, f in [
        ("\\boxed{4}", 1.0, "stop"), ("\\boxed{5}", 0.0, "stop"), ("\\boxed{6}", 0.0, "stop"),
        ("five", 0.0, "stop"), ("on and on", 0.0, "length")]]
    assert failure_shares(rows) == {"wrong_boxed": 0.4, "wrong_unboxed": 0.2, "truncated": 0.2}


def test_ab_with_the_paper_prompt_uses_the_completions_route_and_reports_failures(url, problems, tmp_path, capsys):
    out = tmp_path / "paper"
    args = ["ab", "--url", url, "--problems", str(problems), "--question-field", "q", "--answer-field", "a",
            "--samples", "1", "--max-tokens", "6", "--arms", "base,tiny-head:gated", "--prompt-style", "paper",
            "--out", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "ab.json").read_text())
    jsonschema.validate(summary, SCHEMA)
    for arm in summary["arms"].values():
        f = arm["failures"]
        assert sum(f.values()) == pytest.approx(1 - arm["pass_at_1"])
    assert json.loads((out / "meta.json").read_text())["config"]["prompt_style"] == "paper"
    html = (out / "report.html").read_text()
    assert "failure taxonomy per arm" in html and "wrong, no box" in html
    # another prompt style is another run: refused, nothing written
    assert main([*args[:-4], "--prompt-style", "chat", "--out", str(out)]) == 2


def test_pairing_against_an_arm_is_antisymmetric_and_counts_discordant_pairs():
    from reasonmaxxer.clients.ab import against

    def rows(arm, rewards):
        return [{"arm": arm, "problem_id": f"p{i // 2}", "sample": i % 2, "reward": r} for i, r in enumerate(rewards)]

    records = rows("a", [1, 1, 0, 0, 1, 0]) + rows("b", [1, 0, 1, 1, 1, 0]) + rows("c", [0, 0])
    ab = against(records, "a")
    assert ab["b"]["pairs"] == 6 and (ab["b"]["fixed"], ab["b"]["broken"]) == (2, 1)
    assert ab["b"]["diff"] == pytest.approx(1 / 6)
    assert ab["c"]["pairs"] == 2  # only the pairs both arms answered
    ba = against(records, "b")["a"]
    assert (ba["fixed"], ba["broken"]) == (1, 2) and ba["diff"] == pytest.approx(-1 / 6)
    assert ba["mcnemar_p"] == ab["b"]["mcnemar_p"] == 1.0
    assert ba["ci95"] == pytest.approx([-x for x in reversed(ab["b"]["ci95"])])
