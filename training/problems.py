"""Problem sets: load math problems from JSON Lines (or a Hugging Face dataset) with recorded provenance.

Contract:

- ``Problem(id, question, answer, source, index)``: frozen. ``source`` names the set (``gsm8k/train``),
  ``index`` is the 0-based record number in the file, ``id`` is ``f"{source}:{own id}"`` where the file has
  its own id field (``PRESETS[...].id_field``), else ``f"{source}:{index}"``: stable across selections.
- ``PRESETS``: read-only mapping name -> ``Preset(question, answer, answer_transform, id_field)`` for the
  files of ``../shared/data`` (see its MANIFEST.md). ``question`` is a field name or a tuple of fields
  joined with " "; ``answer_transform`` turns the raw answer value into the gold answer string.
- ``infer_preset(path)`` -> preset name from the parent folder (or the file stem), or None.
- Without a preset or fields, plain fields are recognised where unambiguous: exactly one of
  ``QUESTION_FIELDS`` and one of ``ANSWER_FIELDS`` in the first record (a GSM8K-style ``####`` answer is cut
  after its marker). Anything else is refused with the record's fields and the flags to pass.
- ``load_problems(source, preset=None, question_field=None, answer_field=None, offset=0, limit=None,
  seed=None)`` -> ``ProblemSet``. Without a seed: records [offset, offset+limit) in file order; with a seed:
  a seeded permutation of all records, then [offset, offset+limit). So train/eval splits are fixed,
  recorded index ranges; ``ProblemSet.selection`` records path, sha256, preset, fields, offset, limit,
  seed, count and the chosen record indices.
- Every failure raises ``ProblemError`` (a ``ValueError``; ``ProblemFileNotFound`` is also a
  ``FileNotFoundError``) with a message that says what to do.
- ``check_disjoint(a, b)`` raises ``ProblemError`` if two sets share a (file, record) or a question text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .verifier import last_boxed


class ProblemError(ValueError):
    """A problem file or selection cannot be used; the message says what to change."""


class ProblemFileNotFound(ProblemError, FileNotFoundError):
    """The problem file does not exist."""


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    source: str
    index: int = -1


@dataclass(frozen=True)
class Preset:
    question: str | tuple[str, ...]
    answer: str
    answer_transform: Callable[[Any], str] | None = None
    id_field: str | None = None


@dataclass
class ProblemSet:
    problems: list[Problem]
    selection: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)

    def __getitem__(self, i: int) -> Problem:
        return self.problems[i]


def format_number(value: Any) -> str:
    """145.0 -> "145", 2.5 -> "2.5", "27.0" -> "27"; anything not numeric -> its stripped text."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return repr(number) if isinstance(value, float) else str(value).strip()


def _as_text(value: Any) -> str:
    """A raw answer value as text: numbers formatted by ``format_number``, strings stripped."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_number(value)
    return str(value).strip()


def gsm8k_answer(value: Any) -> str:
    """The text after the last ``####``, commas stripped."""
    text = str(value)
    if "####" not in text:
        raise ValueError("no '####' marker in the answer")
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def boxed_answer(value: Any) -> str:
    """The content of the last ``\\boxed{...}`` of a worked solution."""
    content = last_boxed(str(value))
    if content is None:
        raise ValueError("no \\boxed{...} in the solution")
    return content.strip()


def strip_dollars(value: Any) -> str:
    """Remove unescaped ``$`` math delimiters: "$\\frac{1}{2}$" -> "\\frac{1}{2}", "$69$,$84$" -> "69,84"."""
    return re.sub(r"(?<!\\)\$", "", str(value)).strip()


def list_answer(value: Any) -> str:
    """OlympiadBench ``final_answer``: a list (or its repr) -> its elements joined with ", ", ``$`` removed."""
    items = ast.literal_eval(value) if isinstance(value, str) and value.lstrip().startswith("[") else value
    if not isinstance(items, list | tuple):
        items = [items]
    return ", ".join(strip_dollars(item) for item in items)


PRESETS: Mapping[str, Preset] = MappingProxyType({
    "gsm8k": Preset("question", "answer", gsm8k_answer),
    "svamp": Preset(("Body", "Question"), "Answer", format_number, "ID"),
    "math500": Preset("problem", "answer", None, "unique_id"),
    "aime24": Preset("problem", "answer", None, "id"),
    "amc23": Preset("question", "answer", format_number, "id"),
    "minerva": Preset("problem", "solution", boxed_answer),
    "olympiadbench": Preset("question", "final_answer", list_answer, "id"),
    "college_math": Preset("question", "answer", strip_dollars),
    "math_cot": Preset("question", "gt", None, "idx"),
})

_ALIASES: Mapping[str, str] = MappingProxyType({
    "minerva_math": "minerva", "eval_rm_maj_example": "math_cot", "math_cot_100": "math_cot",
    "math-500": "math500", "collegemath": "college_math",
})


def _preset_name(name: str) -> str | None:
    key = name.lower()
    if key in PRESETS:
        return key
    return _ALIASES.get(key)


def infer_preset(path: str | Path) -> str | None:
    """Preset name from the file's parent folder (``gsm8k/train.jsonl`` -> gsm8k) or its stem, else None."""
    p = Path(str(path).split(":", 1)[1] if str(path).startswith("hf:") else path)
    for candidate in (p.parent.name, p.stem, p.name):
        found = _preset_name(candidate)
        if found:
            return found
    for name in sorted(PRESETS, key=len, reverse=True):
        if p.stem.lower().startswith(name):
            return name
    return None


def _read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], bytes]:
    """Records as (line number, dict) plus the raw bytes; blank lines are skipped."""
    if not path.is_file():
        raise ProblemFileNotFound(
            f"No problem file at {str(path)!r} (relative paths start at {str(Path.cwd())!r}). Pass a JSON Lines "
            "file you have (one object per line with a question and an answer field), or hf:NAME[:split] for a "
            "Hugging Face dataset where the network allows (its question and answer fields by --preset or "
            "--question-field and --answer-field)."
        )
    raw = path.read_bytes()
    records: list[tuple[int, dict]] = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProblemError(
                f"{path}: line {number} is not JSON ({e.msg}). The file must be JSON Lines: one JSON object per line."
            ) from None
        if not isinstance(record, dict):
            raise ProblemError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object.")
        records.append((number, record))
    return records, raw


def _read_hf(name: str) -> tuple[list[tuple[int, dict]], bytes]:
    dataset_name, _, split = name.partition(":")
    try:
        import datasets  # optional and heavy: imported on use
    except ImportError:
        raise ProblemError(
            f"hf:{name} needs the `datasets` package (pip install datasets) and network access to the Hub; "
            "or pass a local JSONL file instead."
        ) from None
    rows = datasets.load_dataset(dataset_name, split=split or "train")
    records = [(i + 1, dict(row)) for i, row in enumerate(rows)]
    raw = json.dumps([r for _, r in records], sort_keys=True, default=str).encode()
    return records, raw


QUESTION_FIELDS = ("question", "problem", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "gt", "target", "label")


def _detect(first: dict, names: tuple[str, ...], what: str, flag: str, source: str) -> str:
    """The one field of `first` among `names`; ProblemError naming the record's fields otherwise."""
    found = [n for n in names if n in first]
    if len(found) == 1:
        return found[0]
    why = f"it has several {what} fields ({', '.join(found)})" if found else f"no {what} field ({' / '.join(names)})"
    raise ProblemError(
        f"Cannot tell the fields of {source!r}: no preset matches its folder or name, and {why}; its records have "
        f"fields {', '.join(first) or 'none'}. Pass {flag} with the right name (--question-field and --answer-field "
        f"for a file of your own), or --preset (one of {', '.join(PRESETS)})."
    )


def _check_preset(preset: str | None) -> None:
    if preset is not None and _preset_name(preset) is None:
        raise ProblemError(f"Unknown preset {preset!r}. Known presets: {', '.join(PRESETS)}.")


def _resolve_fields(
    source: str, preset: str | None, question_field: str | None, answer_field: str | None, first: dict | None = None
) -> tuple[str | None, Preset]:
    """The preset name (or None) and the fields to read: flags, else the preset, else detected in `first`."""
    name = preset or infer_preset(source)
    _check_preset(preset)
    base = PRESETS[_preset_name(name)] if name else None
    detected = None  # the answer transform of detected fields
    if base is None and not (question_field and answer_field):
        first = first or {}
        question_field = question_field or _detect(first, QUESTION_FIELDS, "question", "--question-field", source)
        if not answer_field:
            answer_field = _detect(first, ANSWER_FIELDS, "answer", "--answer-field", source)
            detected = gsm8k_answer if "####" in str(first.get(answer_field, "")) else None
    question = tuple(f.strip() for f in question_field.split(",")) if question_field else base.question
    if isinstance(question, tuple) and len(question) == 1:
        question = question[0]
    answer = answer_field or base.answer
    transform = base.answer_transform if base and not answer_field else detected
    id_field = base.id_field if base else None
    return (_preset_name(name) if name else None), Preset(question, answer, transform, id_field)


def _select(count: int, offset: int, limit: int | None, seed: int | None, where: str) -> list[int]:
    if offset < 0 or (limit is not None and limit < 0):
        raise ProblemError(f"offset and limit must be >= 0 (got offset={offset}, limit={limit}).")
    order = list(range(count))
    if seed is not None:
        random.Random(seed).shuffle(order)
    chosen = order[offset:] if limit is None else order[offset : offset + limit]
    if not chosen:
        raise ProblemError(
            f"Empty selection: {where} has {count} records, but offset={offset}, limit={limit} selects none. "
            f"Use an offset below {count} and a positive limit."
        )
    return chosen


def _field(record: dict, name: str, number: int, where: str, flag: str) -> Any:
    if name not in record or record[name] is None:
        raise ProblemError(
            f"{where}: line {number} has no {name!r} field (fields: {', '.join(record) or 'none'}). "
            f"Pass {flag} with the right field name, or --preset (one of {', '.join(PRESETS)})."
        )
    return record[name]


def _make_problem(record: dict, number: int, index: int, spec: Preset, where: str, set_name: str) -> Problem:
    fields = (spec.question,) if isinstance(spec.question, str) else spec.question
    question = " ".join(str(_field(record, f, number, where, "--question-field")).strip() for f in fields)
    raw_answer = _field(record, spec.answer, number, where, "--answer-field")
    try:
        answer = spec.answer_transform(raw_answer) if spec.answer_transform else _as_text(raw_answer)
    except (ValueError, SyntaxError) as e:
        raise ProblemError(
            f"{where}: line {number}: cannot read the gold answer from field {spec.answer!r} ({e}). "
            "Pass --answer-field with a field that holds the final answer."
        ) from None
    if not answer:
        raise ProblemError(f"{where}: line {number}: the gold answer in field {spec.answer!r} is empty.")
    own_id = record.get(spec.id_field) if spec.id_field else None
    return Problem(f"{set_name}:{own_id if own_id is not None else index}", question, answer, set_name, index)


def _set_name(source: str) -> str:
    if source.startswith("hf:"):
        return source[3:]
    p = Path(source)
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem


def load_problems(
    source: str | Path,
    preset: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    offset: int = 0,
    limit: int | None = None,
    seed: int | None = None,
) -> ProblemSet:
    """Load a selection of problems from a JSONL path or ``hf:NAME[:split]``; see the module docstring."""
    source = str(source)
    _check_preset(preset)  # before reading anything
    records, raw = _read_hf(source[3:]) if source.startswith("hf:") else _read_jsonl(Path(source))
    name, spec = _resolve_fields(source, preset, question_field, answer_field, records[0][1] if records else {})
    where = source
    indices = _select(len(records), offset, limit, seed, where)
    set_name = _set_name(source)
    problems = [_make_problem(records[i][1], records[i][0], i, spec, where, set_name) for i in indices]
    digest = hashlib.sha256(raw).hexdigest()
    selection = {
        "path": source if source.startswith("hf:") else str(Path(source).resolve()),
        "sha256": digest, "sha256_16": digest[:16], "preset": name,
        "question_field": list(spec.question) if isinstance(spec.question, tuple) else spec.question,
        "answer_field": spec.answer, "offset": offset, "limit": limit, "seed": seed,
        "records": len(records), "count": len(problems), "indices": indices,
    }
    return ProblemSet(problems, selection)


def check_disjoint(a: ProblemSet, b: ProblemSet) -> None:
    """Raise ProblemError if the two sets share a record of the same file or an identical question."""
    if a.selection.get("sha256") == b.selection.get("sha256"):
        shared = sorted(set(a.selection.get("indices", ())) & set(b.selection.get("indices", ())))
        if shared:
            raise ProblemError(
                f"The two problem sets overlap: {len(shared)} shared records of {a.selection.get('path')} "
                f"(e.g. record {shared[0]}). Use non-overlapping offset/limit ranges with the same seed."
            )
    questions = {_norm(p.question): p for p in a.problems}
    for p in b.problems:
        q = questions.get(_norm(p.question))
        if q is not None:
            raise ProblemError(
                f"The two problem sets share a question: {q.id} and {p.id} ({p.question[:60]!r}...). "
                "Fit and evaluate on different problems."
            )


# The evaluation sets of this project (docs/results.md), by the sha256 prefix of their file in ../shared/data
# (MANIFEST.md): rows that no fit, validation split or checkpoint choice may read. None = every row.
EVALUATION_ROWS: dict[str, tuple[str, range | None]] = {
    "c2c4636bc8d4cb80": ("gsm8k/test.jsonl", None),
    "5ccc0e7fe3935ec0": ("svamp/test.jsonl rows 400-699", range(400, 700)),
    "35dc41080a368085": ("math500/test.jsonl", None),
    "af2b8bd2aa911b63": ("aime24/test.jsonl", None),
    "43707e1ca784602d": ("amc23/test.jsonl", None),
    "0e656b430d3a0a1d": ("minerva_math/test.jsonl", None),
    "bb8c1e38a16ea9ea": ("olympiadbench/test.jsonl", None),
}


def check_not_evaluation(selection: dict, what: str) -> None:
    """Raise ProblemError if `selection` (a ProblemSet's or a rollout file's) reads evaluation rows."""
    entry = EVALUATION_ROWS.get(str(selection.get("sha256", ""))[:16])
    if entry is None:
        return
    name, rows = entry
    indices = selection.get("indices") or []
    shared = [i for i in indices if rows is None or i in rows]
    if shared:
        raise ProblemError(
            f"{what} reads {len(shared)} rows of an evaluation set ({name}, e.g. row {shared[0]}): fit, validate "
            "and pick checkpoints on training pools only (GSM8K train, SVAMP rows 0-399, CollegeMath)."
        )


def _norm(text: str) -> str:
    return " ".join(text.split())

