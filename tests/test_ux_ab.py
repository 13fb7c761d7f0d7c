"""`reasonmaxxer ab` for a new user (issue 14): it compares by default, prints a readable table, and its report's
plots read well (labels clear of the intervals, round ticks, no overlapping labels, fine histogram bins, a text
the gate changed even when every outcome agrees)."""

import json
import re

import pytest
from test_server import _serve, _state, serving_tiny

from reasonmaxxer.cli import main
from reasonmaxxer.clients import ab as ab_module
from reasonmaxxer.clients import report
from reasonmaxxer.server.app import create_app


@pytest.fixture(scope="module")
def url(tiny_model, tokenizer):
    yield from serving_tiny(tiny_model, tokenizer)


@pytest.fixture()
def problems(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(4)))
    return path


def test_ab_without_arms_compares_base_with_every_served_adapter_and_prints_a_table(url, problems, tmp_path, capsys):
    out = tmp_path / "ab"
    assert main(["ab", "--url", url, "--problems", str(problems), "--samples", "2", "--max-tokens", "8",
                 "--verifier-fallbacks", "boxed,last_number", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads((out / "ab.json").read_text())
    assert list(summary["arms"]) == ["base", "tiny-head:gated"]  # plain question/answer fields recognised too
    assert summary["arms"]["tiny-head:gated"]["vs_base"]["pairs"] == 8
    assert "no --arms given" in captured.err and "tiny-head:gated" in captured.err
    lines = captured.out.splitlines()
    header = lines[0].split()
    for column in ("arm", "pass@1", "vs", "McNemar", "fire", "truncated"):
        assert column in header, lines[0]
    base, gated = lines[2], lines[3]
    assert base.startswith("base") and gated.startswith("tiny-head:gated")
    assert re.search(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", gated)  # the paired difference with its CI
    assert "%" in gated and "ab.json" in lines[-1]
    assert not captured.out.lstrip().startswith("{")  # a table, not JSON (that stays in ab.json)


def test_ab_warns_when_only_one_arm_is_left(tiny_model, tokenizer, problems, tmp_path, capsys):
    state, settings = _state(tiny_model, tokenizer)
    state.engine.remove_adapter("tiny-head")
    server, thread, url = _serve(create_app(settings, state))
    try:
        assert main(["ab", "--url", url, "--problems", str(problems), "--limit", "1", "--max-tokens", "4",
                     "--out", str(tmp_path / "ab")]) == 0
    finally:
        server.should_exit = True
        thread.join(10)
    assert "only one arm, so nothing is compared" in capsys.readouterr().err


def _summary(**arm_overrides) -> dict:
    def arm(p, lo, hi, fire, mode="gated", **more):
        hist, edges = ab_module.fire_rate_histogram([fire] * 5)
        return {"adapter": None if mode == "off" else "h", "mode": mode, "threshold": None, "n": 10, "pass_at_1": p,
                "ci95": [lo, hi], "fire_rate_mean": fire, "fire_rate_histogram": hist, "fire_rate_bins": edges,
                "tokens_per_answer": 50.0, "tokens_per_s": 10.0, "latency_s": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
                "failures": {"wrong_boxed": 0.1, "wrong_unboxed": 0.1, "truncated": 0.3}, **more}

    vs = {"pairs": 10, "diff": 0.0, "ci95": [-0.1, 0.1], "mcnemar_p": 1.0}
    arms = {"base": arm(0.24, 0.15, 0.33, 0.0, "off"), "h:gated": arm(0.25, 0.16, 0.34, 0.031, vs_base=vs),
            "h:gated@1.5": arm(0.25, 0.16, 0.34, 0.0312, vs_base=vs), **arm_overrides}
    return {"schema_version": 1, "arms": arms, "disagreements": [], "differences": []}


def test_nice_ticks_are_round_and_end_just_above_the_data():
    assert report.nice_ticks(0.55) == [0.0, 0.2, 0.4, 0.6]  # not 0.00 / 0.28 / 0.55
    assert report.nice_ticks(0.034, 4) == [0.0, 0.01, 0.02, 0.03, 0.04]
    assert report.nice_ticks(7, 4) == [0, 2, 4, 6, 8]
    for top in (0.013, 0.27, 0.5, 0.99, 3.0, 41.0):
        ticks = report.nice_ticks(top)
        step = ticks[1]
        assert ticks[-1] >= top > ticks[-1] - step and 3 <= len(ticks) <= 11, (top, ticks)


def test_the_pass_at_1_label_sits_beside_the_bar_not_on_the_error_bar():
    svg = report._bars(_summary()["arms"])
    ends = {round(float(y), 1) for y in re.findall(r'<line x1="[\d.]+" y1="[\d.]+" x2="[\d.]+" y2="([\d.]+)" '
                                                  r'stroke="#000"', svg)}
    labels = re.findall(r'<text class="value" x="([\d.]+)" y="([\d.]+)"[^>]*>([\d.]+)</text>', svg)
    xs = [float(x) for x in re.findall(r'<line x1="([\d.]+)" y1="[\d.]+" x2="[\d.]+" y2="[\d.]+" stroke="#000"', svg)]
    assert len(labels) == 3
    for (x, y, _), cx in zip(labels, xs, strict=True):
        assert float(x) > cx and round(float(y) + 4, 1) not in ends  # right of the interval, not atop it
    ticks = re.findall(r'text-anchor="end">([\d.]+)</text>', svg)
    assert ticks == ["0", "0.1", "0.2", "0.3", "0.4"]  # round ticks, ending just above the highest interval (0.34)


def test_points_that_coincide_share_one_label():
    svg = report._scatter(_summary()["arms"])
    labels = re.findall(r'<text class="point"[^>]*>([^<]+)</text>', svg)
    assert sorted(labels) == ["1", "2, 3"]  # base alone; the two gated arms at ~3.1% share a label


def test_the_fire_rate_histogram_has_a_count_axis_and_bins_fine_enough_for_3_percent():
    counts, edges = ab_module.fire_rate_histogram([0.01, 0.031, 0.031, 0.033, 0.04])
    assert len(counts) == 20 and edges[-1] == 0.05 and sum(counts) == 5
    assert len([c for c in counts if c]) >= 4  # a 3% rate is not one bar
    svg = report._histogram("h:gated", counts, edges)
    assert re.findall(r'<text class="count"[^>]*>(\d+)</text>', svg)[-1] == "2"
    assert "1.0%" in svg and "answers (count)" in svg
    assert ab_module.fire_rate_histogram([1.0])[1][-1] == 1.0  # always: the axis reaches 100%


def test_the_report_shows_what_the_gate_did_when_every_outcome_agrees():
    base = {"arm": "base", "problem_id": "p0", "sample": 0, "gold": "4", "text": "it is 5", "reward": 0.0,
            "finish_reason": "stop", "tokens": 3, "gate_fired": 0, "fire_rate": 0.0, "latency_s": 1.0}
    gated = {**base, "arm": "h:gated", "text": "it was 6", "pieces": ["it", " was", " 6"], "fired_at": [1],
             "gate_fired": 1, "fire_rate": 1 / 3}
    arms = ab_module.parse_arms("base,h:gated")
    summary = ab_module.aggregate([base, gated], arms)
    assert summary["disagreements"] == [] and len(summary["differences"]) == 1
    html = report.render(summary)
    assert "Every pair has the same outcome" in html and "<mark title='gate fired'> was</mark>" in html
