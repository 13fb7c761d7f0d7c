"""Problem loading: every preset on its real file in ../shared/data, seeded selections, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonmaxxer.training.problems import (
    PRESETS,
    ProblemError,
    check_disjoint,
    infer_preset,
    load_problems,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no shared data folder at {DATA} (see MANIFEST.md)")

# file, preset, records, sha256 prefix (from MANIFEST.md)
FILES = [
    ("gsm8k/train.jsonl", "gsm8k", 7473, "17f347dc51477c50"),
    ("gsm8k/test.jsonl", "gsm8k", 1000, "c2c4636bc8d4cb80"),
    ("svamp/test.jsonl", "svamp", 700, "5ccc0e7fe3935ec0"),
    ("math500/test.jsonl", "math500", 500, "35dc41080a368085"),
    ("aime24/test.jsonl", "aime24", 30, "af2b8bd2aa911b63"),
    ("amc23/test.jsonl", "amc23", 40, "43707e1ca784602d"),
    ("minerva_math/test.jsonl", "minerva", 272, "0e656b430d3a0a1d"),
    ("olympiadbench/test.jsonl", "olympiadbench", 675, "bb8c1e38a16ea9ea"),
    ("college_math/test.jsonl", "college_math", 2818, "91131bc4a355b884"),
    ("eval_rm_maj_example/math_cot_100.jsonl", "math_cot", 100, "5b9128525733336c"),
]


@needs_data
@pytest.mark.parametrize(("rel", "preset", "count", "sha"), FILES)
def test_every_preset_loads_its_real_file(rel, preset, count, sha):
    assert infer_preset(DATA / rel) == preset
    problems = load_problems(DATA / rel)
    assert len(problems) == count
    assert problems.selection["preset"] == preset
    assert problems.selection["sha256_16"] == sha
    assert problems.selection["records"] == count
    assert problems.selection["indices"] == list(range(count))
    assert all(p.question.strip() and p.answer.strip() for p in problems)
    if preset in ("college_math", "olympiadbench"):
        assert not any("$" in p.answer.replace("\\$", "") for p in problems), "math delimiters are stripped"
    assert len({p.id for p in problems}) == count, "problem ids must be unique"
    assert [p.index for p in problems] == list(range(count))


@needs_data
@pytest.mark.parametrize(
    ("rel", "index", "answer", "question_start", "problem_id"),
    [
        ("gsm8k/train.jsonl", 0, "72", "Natalia sold clips", "gsm8k/train:0"),
        ("gsm8k/test.jsonl", 2, "70000", "Josh decides", "gsm8k/test:2"),
        ("svamp/test.jsonl", 0, "145", "There are 87 oranges", "svamp/test:chal-777"),
        ("math500/test.jsonl", 0, "\\left( 3, \\frac{\\pi}{2} \\right)", "Convert the point", None),
        ("aime24/test.jsonl", 0, "204", "Every morning Aya", "aime24/test:60"),
        ("amc23/test.jsonl", 0, "27", "Cities $A$ and $B$", "amc23/test:0"),
        ("minerva_math/test.jsonl", 0, "1.6", "Each of the two Magellan", "minerva_math/test:0"),
        ("olympiadbench/test.jsonl", 1, "\\frac{1}{2 n+2}", None, None),
        ("college_math/test.jsonl", 0, "10-4 n", "Simplify", "college_math/test:0"),
        ("eval_rm_maj_example/math_cot_100.jsonl", 0, "420", None, None),
    ],
)
def test_spot_checks(rel, index, answer, question_start, problem_id):
    problem = load_problems(DATA / rel, offset=index, limit=1)[0]
    assert problem.answer == answer
    assert problem.index == index
    if question_start:
        assert problem.question.startswith(question_start)
    if problem_id:
        assert problem.id == problem_id


@needs_data
def test_svamp_joins_body_and_question():
    row = json.loads((DATA / "svamp/test.jsonl").read_text().splitlines()[0])
    assert load_problems(DATA / "svamp/test.jsonl", limit=1)[0].question == f"{row['Body']} {row['Question']}"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def toy(tmp_path) -> Path:
    return _write(tmp_path / "toy.jsonl", [{"q": f"What is {i} + 1?", "a": i + 1, "extra": "x"} for i in range(40)])


def test_seeded_selection_is_deterministic_and_disjoint(toy):
    kw = {"question_field": "q", "answer_field": "a", "seed": 7}
    train = load_problems(toy, offset=0, limit=25, **kw)
    again = load_problems(toy, offset=0, limit=25, **kw)
    held = load_problems(toy, offset=25, limit=15, **kw)
    assert train.problems == again.problems
    assert train.selection["indices"] == again.selection["indices"]
    assert train.selection["indices"] != list(range(25)), "a seed must permute"
    assert sorted(train.selection["indices"] + held.selection["indices"]) == list(range(40))
    check_disjoint(train, held)
    with pytest.raises(ProblemError, match="overlap"):
        check_disjoint(train, load_problems(toy, offset=20, limit=10, **kw))
    other = load_problems(toy, offset=0, limit=25, question_field="q", answer_field="a", seed=8)
    assert other.selection["indices"] != train.selection["indices"]
    sel = train.selection
    assert (sel["offset"], sel["limit"], sel["seed"], sel["count"], sel["records"]) == (0, 25, 7, 25, 40)
    assert len(sel["sha256"]) == 64 and sel["sha256"].startswith(sel["sha256_16"])


def test_unseeded_selection_is_file_order(toy):
    problems = load_problems(toy, question_field="q", answer_field="a", offset=5, limit=3)
    assert [p.index for p in problems] == [5, 6, 7]
    assert [p.answer for p in problems] == ["6", "7", "8"]
    assert problems[0].id == "toy:5" or problems[0].id.endswith("/toy:5")


def test_custom_fields_join_and_override(toy):
    problems = load_problems(toy, question_field="q,extra", answer_field="a", limit=1)
    assert problems[0].question == "What is 0 + 1? x"
    assert problems.selection["question_field"] == ["q", "extra"]


def test_disjoint_by_question_text_across_files(tmp_path, toy):
    copy = _write(tmp_path / "copy.jsonl", [{"question": "What is 3 + 1?", "answer": "4"}])
    a = load_problems(toy, question_field="q", answer_field="a")
    b = load_problems(copy, question_field="question", answer_field="answer")
    with pytest.raises(ProblemError, match="share a question"):
        check_disjoint(a, b)


def test_missing_file(tmp_path):
    missing = tmp_path / "gsm8k" / "nope.jsonl"
    with pytest.raises(ProblemError, match="No problem file") as info:
        load_problems(missing)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in str(info.value)


def test_bad_json_line_names_the_line(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"q": "a", "a": 1}, {"q": "b", "a": 2}, "{not json"])
    with pytest.raises(ProblemError, match="line 3 is not JSON"):
        load_problems(bad, question_field="q", answer_field="a")


def test_missing_field_names_field_line_and_flag(tmp_path):
    rows = _write(tmp_path / "rows.jsonl", [{"q": "a", "a": 1}, {"text": "b", "a": 2}])
    with pytest.raises(ProblemError) as info:
        load_problems(rows, question_field="q", answer_field="a")
    message = str(info.value)
    assert "'q'" in message and "line 2" in message and "--question-field" in message
    with pytest.raises(ProblemError, match="--answer-field"):
        load_problems(rows, question_field="q", answer_field="answer")


def test_empty_selection_says_row_count(toy):
    with pytest.raises(ProblemError, match="40 records") as info:
        load_problems(toy, question_field="q", answer_field="a", offset=40, limit=5)
    assert "offset=40" in str(info.value)
    with pytest.raises(ProblemError, match="Empty selection"):
        load_problems(toy, question_field="q", answer_field="a", limit=0)


def test_unknown_preset_lists_presets(toy):
    with pytest.raises(ProblemError, match="Unknown preset") as info:
        load_problems(toy, preset="gsm9k")
    assert all(name in str(info.value) for name in PRESETS)


def test_no_preset_and_no_fields(toy):
    assert infer_preset(toy) is None
    with pytest.raises(ProblemError, match="--question-field"):
        load_problems(toy)


def test_bad_gold_answer_says_which_field(tmp_path):
    rows = _write(tmp_path / "x.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ProblemError, match="'answer'"):
        load_problems(rows, preset="gsm8k")


def test_hf_source_without_datasets_is_clear():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ProblemError, match="datasets"):
            load_problems("hf:openai/gsm8k:test", question_field="question", answer_field="answer")
    else:
        pytest.skip("the datasets package is installed; the Hub is not reachable from tests")


def test_infer_preset_from_names():
    assert infer_preset("/x/gsm8k/train.jsonl") == "gsm8k"
    assert infer_preset("svamp.jsonl") == "svamp"
    assert infer_preset("/x/minerva_math/test.jsonl") == "minerva"
    assert infer_preset("/x/eval_rm_maj_example/math_cot_100.jsonl") == "math_cot"
    assert infer_preset("/x/y/z.jsonl") is None


def test_plain_question_answer_fields_are_recognised(tmp_path):
    rows = _write(tmp_path / "mine.jsonl", [{"question": "What is 2 + 3?", "answer": 5},
                                             {"question": "What is 4 + 4?", "answer": "8"}])
    problems = load_problems(rows)
    assert [(p.question, p.answer) for p in problems] == [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8")]
    assert problems.selection["question_field"] == "question" and problems.selection["answer_field"] == "answer"
    worked = _write(tmp_path / "worked.jsonl", [{"problem": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"}])
    assert load_problems(worked)[0].answer == "4"  # a GSM8K-style worked answer: the text after ####
    only_q = _write(tmp_path / "q.jsonl", [{"prompt": "2 + 2?", "sol": "4"}])
    assert load_problems(only_q, answer_field="sol")[0].question == "2 + 2?"


def test_ambiguous_or_unknown_fields_are_refused_with_the_fields_named(tmp_path):
    both = _write(tmp_path / "both.jsonl", [{"question": "a", "problem": "b", "answer": "1"}])
    with pytest.raises(ProblemError, match="several question fields") as info:
        load_problems(both)
    assert "--question-field" in str(info.value)
    odd = _write(tmp_path / "odd.jsonl", [{"q": "a", "a": "1"}])
    with pytest.raises(ProblemError, match="fields q, a") as info:
        load_problems(odd)
    assert "--question-field" in str(info.value) and "--preset" in str(info.value)


def test_a_missing_file_is_reported_as_missing_even_without_a_preset(tmp_path):
    with pytest.raises(ProblemError, match="No problem file"):
        load_problems(tmp_path / "x.jsonl")
