"""Answer checking: extraction rules, math-verify equivalence, labelled fixture agreement, bounded time."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from reasonmaxxer.training.verifier import Verifier, _Worker, extract_answer, last_boxed, score, score_many

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval_rm_maj_example" / "math_cot_100.jsonl"


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=2, timeout_s=5.0) as v:
        yield v.warm()


def test_last_boxed_nested_and_last_wins():
    assert last_boxed("so \\boxed{\\frac{1}{2}} and") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} then \\boxed{ 2 }") == "2"
    assert last_boxed("\\boxed{\\left\\{1, 2\\right\\}}") == "\\left\\{1, 2\\right\\}"
    assert last_boxed("$\\fbox{7}$") == "7"
    assert last_boxed("\\boxed {x^{2}}") == "x^{2}"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{3") is None


def test_extract_answer_default_is_boxed_only():
    assert extract_answer("The answer is 5.") is None
    assert extract_answer("#### 72") is None
    assert extract_answer("The answer is \\boxed{5}.") == "5"


def test_extract_answer_fallbacks():
    assert extract_answer("steps\n#### 1,200\n", ("boxed", "gsm8k")) == "1200"
    assert extract_answer("So the answer is $\\frac{3}{4}$.", ("boxed", "answer_is")) == "\\frac{3}{4}"
    assert extract_answer("Answer: 12", ("answer_is",)) == "12"
    assert extract_answer("we get 3, then 4,500 apples", ("last_number",)) == "4500"
    assert extract_answer("\\boxed{9} #### 8", ("gsm8k", "boxed")) == "8"
    with pytest.raises(ValueError, match="Unknown answer extractor"):
        extract_answer("x", ("regex",))


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("so \\boxed{72}.", "72", 1.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "$\\frac{1}{2}$", 1.0),
        ("\\boxed{1,000}", "1000", 1.0),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
        ("\\boxed{x^{2}+2x+1}", "(x+1)^2", 1.0),
        ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
        ("\\boxed{71}", "72", 0.0),
        ("The answer is 72.", "72", 0.0),
        ("\\boxed{71} no wait \\boxed{72}", "72", 1.0),
        ("\\boxed{72} no wait \\boxed{71}", "72", 0.0),
        ("\\boxed{\\frac{1}{\\sqrt{4}}}", "1/2", 1.0),
        ("\\boxed{}", "0", 0.0),
    ],
)
def test_hand_made_cases(verifier, completion, gold, expected):
    assert verifier.score(completion, gold) == expected


def test_truncated_is_wrong_even_when_right(verifier):
    assert verifier.score("\\boxed{72}", "72", truncated=True) == 0.0
    assert verifier.score_many([("\\boxed{72}", "72")] * 2, truncated=[True, False]) == [0.0, 1.0]


def test_agreement_with_labelled_fixture(verifier):
    if not FIXTURE.is_file():
        pytest.skip(f"no fixture at {FIXTURE} (see ../shared/data/MANIFEST.md)")
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    pairs = [(code, row["gt"]) for row in rows for code in row["code"]]
    labels = [float(flag) for row in rows for flag in row["score"]]
    assert len(pairs) == 800
    started = time.monotonic()
    got = verifier.score_many(pairs)
    elapsed = time.monotonic() - started
    agreement = sum(a == b for a, b in zip(got, labels, strict=True)) / len(labels)
    print(f"math_cot_100 agreement {agreement:.4f} over {len(labels)} labelled solutions in {elapsed:.1f}s")
    # measured 799/800: the one disagreement is a label error (gold "10{,}000", boxed "10000", labelled wrong)
    assert agreement >= 0.98
    assert elapsed < 30


def test_pathological_input_is_bounded():
    with Verifier(workers=1, timeout_s=2.0) as v:
        started = time.monotonic()
        assert v.score("\\boxed{9^{9^{9^{9}}}}", "1") == 0.0
        assert time.monotonic() - started < 8
        assert v.score("\\boxed{2}", "2.0") == 1.0, "the verifier keeps working after a timeout"


def test_overrun_worker_is_killed_and_restarted():
    worker = _Worker(inner_timeout=600)  # math-verify's own alarm would come far too late: the kill bounds it
    try:
        worker.start()
        started = time.monotonic()
        assert worker.check("1", "9^{9^{9^{9}}}", timeout=1.5) is False
        assert time.monotonic() - started < 5
        assert worker.proc is None
        assert worker.check("3", "3.0", timeout=30) is True
    finally:
        worker.stop()


def test_score_from_another_thread(verifier):
    results: list[float] = []
    thread = threading.Thread(target=lambda: results.append(verifier.score("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}")))
    thread.start()
    thread.join(timeout=30)
    assert results == [1.0]


def test_module_level_helpers():
    assert score("\\boxed{0.25}", "\\frac14") == 1.0
    assert score("no box", "1") == 0.0
    assert score_many([("\\boxed{3}", "3"), ("\\boxed{4}", "5")], workers=1) == [1.0, 0.0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        Verifier(workers=0)
    with Verifier(workers=1) as v, pytest.raises(ValueError, match="flags"):
        v.score_many([("a", "b")], truncated=[True, False])


def test_closed_verifier_refuses():
    v = Verifier(workers=1)
    v.close()
    with pytest.raises(RuntimeError, match="closed"):
        v.score("\\boxed{1}", "2")
