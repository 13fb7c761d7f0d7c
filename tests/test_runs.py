"""runs/: a long stage killed midway resumes from committed records in a fresh clone and ends with what an
uninterrupted run writes; the compact record format; the folder stays within its limits."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonmaxxer.cli import main
from reasonmaxxer.training import records
from reasonmaxxer.training.rollouts import load_rollouts

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "reasonmaxxer.cli"]
FILE_LIMIT, FOLDER_LIMIT = 25 * 2**20, 150 * 2**20


def _key(r):
    return r["problem_id"], r["sample"]


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_compact_records_skip_a_torn_member_and_append_after_it(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    with path.open("wb") as f:
        for i in range(3):
            records.append(f, {"i": i, "text": "dropped by compact()"}, compact_form=True)
    whole = path.read_bytes()
    path.write_bytes(whole + gzip.compress(b'{"i": 3}\n')[:-5])  # the last write cut short
    assert [json.loads(x)["i"] for x in records.read_lines(path)] == [0, 1, 2]
    records.truncate_torn(path)
    assert path.read_bytes() == whole
    assert gzip.decompress(whole).decode().count("\n") == 3  # a standard gzip file: zcat reads it
    assert records.compact({"question": "q", "text": "t", "completion_ids": [1]}) == {"completion_ids": [1]}


def test_a_stage_killed_midway_resumes_from_committed_records_in_a_fresh_clone(tiny_model, tokenizer, tmp_path,
                                                                               capsys):
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                for i in range(12)))
    args = ["rollouts", "--model", str(folder), "--problems", str(problems), "--samples", "3", "--max-tokens", "48",
            "--concurrency", "2", "--dtype", "float32"]

    whole = tmp_path / "whole.jsonl.gz"  # the uninterrupted run
    assert main([*args, "--out", str(whole)]) == 0
    capsys.readouterr()

    repo = tmp_path / "repo"
    out = repo / "runs" / "t" / "r.jsonl.gz"
    out.parent.mkdir(parents=True)
    _git(repo, "init", "-q")
    proc = subprocess.Popen([*CLI, *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and (not out.exists() or len(records.read_lines(out)) < 4):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: what is on disk is all that is left
    proc.communicate(timeout=60)
    kept = load_rollouts(out)[1]
    assert 3 <= len(kept) < 36, "the run was not killed midway; raise --max-tokens"
    _git(repo, "add", "runs")
    _git(repo, "commit", "-q", "-m", "progress")

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    resumed = clone / "runs" / "t" / "r.jsonl.gz"
    done = subprocess.run([*CLI, *args, "--out", str(resumed)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"({len(kept)} already there: {36 - len(kept)} to sample)" in done.stderr  # nothing redone

    got, expected = load_rollouts(resumed), load_rollouts(whole)
    assert got[0] == expected[0]  # the meta line
    assert sorted(got[1], key=_key) == sorted(expected[1], key=_key)  # every record, field for field
    for r in got[1]:
        assert "question" not in r and "text" not in r and r["prompt_ids"] and "row" in r


def test_runs_stay_within_their_limits():
    runs = ROOT / "runs"
    files = [p for p in runs.rglob("*") if p.is_file()] if runs.is_dir() else []
    big = [f"{p.relative_to(ROOT)} ({p.stat().st_size / 2**20:.1f} MB)" for p in files if p.stat().st_size > FILE_LIMIT]
    assert not big, f"files over 25 MB in runs/: {big}; keep records compact (.jsonl.gz, token ids)"
    for run in (p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else ():
        size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
        assert size <= FOLDER_LIMIT, f"{run.name} holds {size / 2**20:.0f} MB, over 150 MB"
        assert (run / "README.md").is_file(), f"runs/{run.name} has no README.md (the command that resumes it)"


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz"])
def test_a_damaged_middle_line_is_an_error_not_a_silent_loss(tmp_path, name):
    path = tmp_path / name
    with path.open("wb") as f:
        for obj in ({"meta": {}}, {"a": 1}):
            records.append(f, obj, records.is_compact(path))
        bad = b"{not json\n"
        f.write(gzip.compress(bad) if records.is_compact(path) else bad)
        records.append(f, {"b": 2}, records.is_compact(path))
    with pytest.raises(ValueError, match="damaged"):
        load_rollouts(path)
