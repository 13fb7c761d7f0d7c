"""The `reasonmaxxer` console script, run as a user would (a real subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.models import load_model

CLI = [sys.executable, "-m", "reasonmaxxer.cli"]


def run(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_prepare_model_prints_the_folder():
    out = run("prepare-model")
    assert out.returncode == 0, out.stderr
    folder = Path(out.stdout.strip().splitlines()[-1])
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_prepare_unknown_model_fails_clearly():
    out = run("prepare-model", "gpt-17")
    assert out.returncode == 2
    assert "Unknown model 'gpt-17'" in out.stderr and "smollm2-135m-instruct" in out.stderr


def test_generate_with_a_gated_adapter_prints_text_and_report(tmp_path):
    model, tok = load_model("smollm2-135m-instruct", dtype="float32")
    HeadAdapter.create(model, tok, "cli-head", tau=0.5, b_std=0.5).save(tmp_path / "cli-head")
    out = run("generate", "What is 2+3?", "--adapter", str(tmp_path / "cli-head"), "--max-tokens", "12", "--trace")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]  # --trace: JSON lines only
    tokens, last = lines[:-1], lines[-1]
    assert last["steering"]["adapter"] == "cli-head" and last["steering"]["mode"] == "gated" and last["text"]
    report = last["steering"]
    assert len(tokens) == report["tokens"] and sum(t["fired"] for t in tokens) == report["gate_fired"]
    assert all({"position", "entropy", "fired", "base_token", "chosen_token", "text"} <= set(t) for t in tokens)
    plain = run("generate", "What is 2+3?", "--max-tokens", "4")
    assert plain.returncode == 0 and plain.stdout.strip()
    assert json.loads(plain.stderr.split("[steering] ")[-1].splitlines()[0])["mode"] == "off"


def test_generate_serves_a_bundled_adapter_by_the_name_v1_models_shows():
    name = "smollm2-135m-instruct-svamp-head"
    out = run("generate", "What is 2+3?", "--adapter", name, "--max-tokens", "6", "--trace")
    assert out.returncode == 0, out.stderr[-1000:]
    assert json.loads(out.stdout.splitlines()[-1])["steering"]["adapter"] == name
    missing = run("generate", "hi", "--adapter", "no-such-adapter", "--max-tokens", "4")
    assert missing.returncode == 2 and "no-such-adapter" in missing.stderr


def test_generate_refuses_a_bad_adapter(tmp_path):
    (tmp_path / "bad").mkdir()
    out = run("generate", "hi", "--adapter", str(tmp_path / "bad"), "--max-tokens", "4")
    assert out.returncode == 2
    assert "adapter.json is missing" in out.stderr


def test_an_abbreviated_flag_is_refused_on_every_subcommand():
    from reasonmaxxer.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert not parser.allow_abbrev and commands
    assert all(not p.allow_abbrev for p in commands.values()), [n for n, p in commands.items() if p.allow_abbrev]
    out = run("rollouts", "--problem", "x.jsonl", "--out", "x.jsonl", timeout=60)  # a prefix of --problems
    # not taken for it, and named before the missing --problems is
    assert out.returncode == 2 and "unrecognized argument --problem: did you mean --problems?" in out.stderr, \
        out.stderr[-500:]
    out = run("ab-report", "--markdow", "x", timeout=60)
    assert out.returncode == 2 and "unrecognized argument --markdow" in out.stderr, out.stderr[-500:]


def test_a_fitted_adapter_is_named_after_its_folder_unless_named():
    from reasonmaxxer.cli import build_parser
    from reasonmaxxer.training.cli import _fit_args, name_of_folder

    parser = build_parser()
    args = parser.parse_args(["fit", "--rollouts", "r.jsonl", "--out", "out/smol-svamp-head"])
    assert _fit_args(args).name == "smol-svamp-head"
    args = parser.parse_args(["fit", "--rollouts", "r.jsonl", "--out", "out/x", "--name", "mine"])
    assert _fit_args(args).name == "mine"
    assert name_of_folder("runs/my adapter (v2)") == "my-adapter-v2-" and name_of_folder("/") == "adapter"
