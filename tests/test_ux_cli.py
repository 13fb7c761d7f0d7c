"""The first hour of a new user (issue 14): help on every flag with its default, one name per concept, and
cheap mistakes reported in seconds, before any model loads; Ctrl-C ends a rollout run with one line."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonmaxxer.cli import COMMANDS, build_parser, main
from reasonmaxxer.training import preflight

CLI = [sys.executable, "-m", "reasonmaxxer.cli"]


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest == "command").choices


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default():
    commands = _subparsers(build_parser())
    assert set(commands) == set(COMMANDS)
    for name, p in commands.items():
        text = p.format_help()
        dests = re.findall(r"(?<![$\w])(?!REASONMAXXER_)[A-Z]+_[A-Z_]+\b", text)  # FIT_KIND, VAL_PROBLEMS, ...
        assert not dests, (name, dests)
        assert "None" not in text, name
        alternatives = {a for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in p._actions:
            if action.help == "==SUPPRESS==" or action.dest == "help":
                continue
            assert action.help, (name, action.option_strings)
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            takes_value = takes_value and action not in alternatives  # ab --url | --model: one is required
            if takes_value:
                shown = p._get_formatter()._expand_help(action)
                assert "default" in shown, (name, action.option_strings, shown)


def test_one_name_for_the_completion_budget():
    commands = _subparsers(build_parser())
    for name in ("rollouts", "fit", "ab", "generate"):
        assert "--max-tokens" in commands[name].format_help(), name
    assert "--max-new-tokens" not in commands["rollouts"].format_help()  # a hidden alias, still accepted
    args = build_parser().parse_args(["rollouts", "--problems", "p", "--out", "o", "--max-new-tokens", "7"])
    assert args.max_new_tokens == 7
    args = build_parser().parse_args(["rollouts", "--problems", "p", "--out", "o", "--max-tokens", "9"])
    assert args.max_new_tokens == 9
    args = build_parser().parse_args(["ab", "--url", "u", "--problems", "p", "--out", "o", "--max-new-tokens", "5"])
    assert args.max_tokens == 5


def _forbid_model_loads(monkeypatch):
    from reasonmaxxer import models

    def loaded(*a, **k):
        raise AssertionError("a model was loaded (or built) before the input was checked")

    for name in ("load_model", "load_tokenizer", "_build"):
        monkeypatch.setattr(models, name, loaded)


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Any model load fails the test: the errors below must come first."""
    _forbid_model_loads(monkeypatch)


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_bad_problem_files_fail_before_any_model_loads(no_model_loads, tmp_path, capsys):
    out = str(tmp_path / "r.jsonl")
    code, err = _run(capsys, "rollouts", "--problems", str(tmp_path / "missing.jsonl"), "--out", out)
    assert code == 2 and "No problem file" in err
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"q": "1 + 1?", "a": "2"}) + "\n")
    code, err = _run(capsys, "rollouts", "--problems", str(odd), "--out", out)
    assert code == 2 and "fields q, a" in err and "--question-field" in err
    code, err = _run(capsys, "fit", "--problems", str(odd), "--out", str(tmp_path / "ad"))
    assert code == 2 and "--question-field" in err
    code, err = _run(capsys, "rollouts", "--problems", str(odd), "--question-field", "q", "--answer-field", "a",
                     "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err
    code, err = _run(capsys, "rollouts", "--problems", str(odd), "--question-field", "q", "--answer-field", "a",
                     "--samples", "0", "--out", out)
    assert code == 2 and "--samples must be at least 1" in err
    code, err = _run(capsys, "rollouts", "--problems", str(odd), "--question-field", "q", "--answer-field", "a",
                     "--verifier-fallbacks", "boxd", "--out", out)
    assert code == 2 and "boxed" in err
    assert not (tmp_path / "r.jsonl").exists()


def test_an_unknown_model_name_fails_at_once_with_the_known_names(no_model_loads, tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    code, err = _run(capsys, "rollouts", "--model", "smollm2-135m", "--problems", str(problems), "--out",
                     str(tmp_path / "r.jsonl"))
    assert code == 2 and "Did you mean 'smollm2-135m-instruct'" in err and "qwen2.5-coder-0.5b-instruct" in err


@pytest.mark.parametrize("offline", ["1", ""])
def test_an_unknown_model_fails_in_seconds_as_a_process(tmp_path, offline):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update({"HF_HUB_OFFLINE": offline} if offline else {"HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing there
    start = time.monotonic()
    out = subprocess.run([*CLI, "rollouts", "--model", "no-such-model", "--problems", str(problems), "--out",
                          str(tmp_path / "r.jsonl")], capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Known models: smollm2-135m-instruct" in out.stderr and "Traceback" not in out.stderr
    assert elapsed < 5, elapsed


def test_an_adapter_for_another_model_fails_before_any_model_loads(monkeypatch, tiny_model, tokenizer, tmp_path,
                                                                 capsys):
    from reasonmaxxer.models import prepare_model
    from reasonmaxxer.steering.adapters import HeadAdapter

    prepare_model("smollm2-135m-instruct")  # its config.json is what the adapter is checked against
    _forbid_model_loads(monkeypatch)
    HeadAdapter.create(tiny_model, tokenizer, "tiny-head", tau=2.0).save(tmp_path / "tiny-head")
    for argv in (["serve", "--adapter", str(tmp_path / "tiny-head"), "--port", "1"],
                 ["generate", "hi", "--adapter", str(tmp_path / "tiny-head")]):
        code, err = _run(capsys, *argv)
        assert code == 2, err
        assert "expects hidden size 64 but the served model has 576" in err and "Traceback" not in err
    code, err = _run(capsys, "serve", "--adapter", str(tmp_path / "nothing"), "--port", "1")
    assert code == 2 and "does not exist" in err


def test_serve_with_a_mismatched_adapter_is_one_line_and_exit_2(tiny_model, tokenizer, tmp_path):
    from reasonmaxxer.steering.adapters import HeadAdapter

    HeadAdapter.create(tiny_model, tokenizer, "tiny-head", tau=2.0).save(tmp_path / "tiny-head")
    out = subprocess.run([*CLI, "serve", "--adapter", str(tmp_path / "tiny-head"), "--port", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("reasonmaxxer serve: error: adapter 'tiny-head'"), out.stderr


def test_the_rollout_summary_warns_and_names_the_flag_to_change():
    summary = {"problems": 4, "rollouts": 16, "pass@1": 0.0, "mixed_problems": 0, "truncated": 1.0}
    warnings = preflight.warnings(summary, samples=4, max_tokens=96)
    assert len(warnings) == 2
    assert "100% of the rollouts hit --max-tokens 96" in warnings[0] and "raise --max-tokens" in warnings[0]
    assert "no problem has mixed outcomes" in warnings[1] and "--samples" in warnings[1]
    fine = {"problems": 40, "rollouts": 320, "pass@1": 0.3, "mixed_problems": 12, "truncated": 0.05}
    assert preflight.warnings(fine, samples=8, max_tokens=384) == []
    assert "only 2 of 40" in preflight.warnings({**fine, "mixed_problems": 2}, 8, 384)[0]
    line = preflight.plan(700, 20, 384, 0, "x.jsonl", limited=False)
    assert "700 problems x 20 samples = 14,000 sequences" in line and "--limit" in line


def _tiny_model_and_problems(tiny_model, tokenizer, tmp_path, n: int):
    """A model folder the CLI loads, and n one-step sums."""
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                for i in range(n)))
    return folder, problems


def test_ctrl_c_ends_rollouts_with_one_line_and_the_run_resumes(tiny_model, tokenizer, tmp_path):
    folder, problems = _tiny_model_and_problems(tiny_model, tokenizer, tmp_path, 40)
    out = tmp_path / "r.jsonl"
    cmd = [*CLI, "rollouts", "--model", str(folder), "--problems", str(problems), "--samples", "4", "--max-tokens",
           "64", "--concurrency", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: to the whole process group (verifier workers too)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("interrupted:"))
    kept = int(re.search(r"interrupted: ([\d,]+) of 160 rollouts are kept", line).group(1))
    assert kept >= 2 and "run the same command to resume" in line and "--max-tokens 64" in line
    assert "rollouts: 40 problems x 4 samples = 160 sequences" in err  # said up front
    again = subprocess.run([*cmd, "--concurrency", "16"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"({kept} already there: {160 - kept} to sample)" in again.stderr
    assert json.loads(again.stdout)["rollouts"] == 160
    assert "tok/s" in again.stderr  # the bar counts tokens
    assert "WARNING" in again.stderr  # the tiny model solves nothing: no mixed problems, said with the fix


def test_option_combinations_that_do_not_go_together_are_refused_first(no_model_loads, tmp_path, capsys):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "1 + 1?", "answer": "2"}) + "\n")
    base = ["--problems", str(problems), "--out", str(tmp_path / "r.jsonl")]
    code, err = _run(capsys, "rollouts", *base, "--vllm-args", '{"enforce_eager": true}')
    assert code == 2 and "add --backend vllm" in err
    code, err = _run(capsys, "fit", "--problems", str(problems), "--val-limit", "5", "--out", str(tmp_path / "ad"))
    assert code == 2 and "--val-limit select validation problems: add --val-problems" in err
    code, err = _run(capsys, "rollouts", *base, "--backend", "vllm", "--fast")
    assert code == 2 and "leave --fast out" in err
    probe = ["probe-branches", "--model", "m", "--rollouts", str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "pb")]
    code, err = _run(capsys, *probe, "--fast")  # its default backend is vllm
    assert code == 2 and "leave --fast out" in err
    code, err = _run(capsys, "ab", "--url", "http://127.0.0.1:9", "--adapter", "x", "--problems", str(problems),
                     "--out", str(tmp_path / "ab"))
    assert code == 2 and "with --url" in err
    assert not (tmp_path / "ab").exists()


@pytest.mark.parametrize("fast", [False, True])
def test_rollouts_take_the_fast_paths_only_when_asked(tiny_model, tokenizer, tmp_path, capsys, monkeypatch, fast):
    """`rollouts --fast` decodes through the engine's fused step (as the server does); without it, the reference
    path, whose numerics the recipe's results were made with. Either way every rollout is written."""
    from reasonmaxxer.steering.fused import FusedDecoder

    folder, problems = _tiny_model_and_problems(tiny_model, tokenizer, tmp_path, 3)
    steps = []
    real = FusedDecoder.__call__
    monkeypatch.setattr(FusedDecoder, "__call__", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    out = tmp_path / "r.jsonl"
    argv = ["rollouts", "--model", str(folder), "--problems", str(problems), "--samples", "2", "--max-tokens", "6",
            "--out", str(out)] + (["--fast"] if fast else [])
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert json.loads(captured.out)["rollouts"] == 6
    assert (len(steps) > 0) == fast


def test_every_subcommand_defaults_to_device_auto_with_one_help():
    """A GPU user's first server, generate, rollouts or fit runs on the GPU: --device is auto everywhere (serve's
    flag falls back to its setting, which is auto), with the same help text."""
    from reasonmaxxer.cli import COMMANDS, build_parser
    from reasonmaxxer.models import DEVICE_HELP
    from reasonmaxxer.server.settings import Settings

    seen = {}
    for name in COMMANDS:
        sub = build_parser(name)._subparsers._group_actions[0].choices[name]
        action = next((a for a in sub._actions if "--device" in a.option_strings), None)
        if action is not None:
            seen[name] = action.default
            # ab passes its flag to the server it starts (clients import nothing of steering: DESIGN.md)
            assert action.help.startswith(DEVICE_HELP) or (name == "ab" and "auto" in action.help), (name, action.help)
    assert {"serve", "generate", "rollouts", "fit", "probe-branches", "ab"} <= set(seen)
    assert all(v == "auto" for k, v in seen.items() if k not in ("serve", "ab")), seen
    assert seen["serve"] is None and seen["ab"] is None and Settings().device == "auto"  # None: the setting's


def test_serve_help_says_plainly_what_each_switch_does_by_default():
    """`--no-bundled-adapter` and `--closed-metrics` are off unless given: the help said "(default: True)"."""
    from reasonmaxxer.cli import build_parser

    text = " ".join(build_parser("serve")._subparsers._group_actions[0].choices["serve"].format_help().split())
    assert "(default: off; env REASONMAXXER_BUNDLED_ADAPTER=false)" in text
    assert "(default: off; env REASONMAXXER_METRICS_OPEN=false)" in text
    assert "default: True" not in text and "default: False" not in text


def test_ctrl_c_in_fit_says_what_is_kept_and_how_to_resume(tiny_model, tokenizer, tmp_path):
    """`fit --problems` samples its rollouts first (the README's recipe does): Ctrl-C there says how many are kept
    and the command that resumes, as `rollouts` does, not a bare "interrupted"."""
    folder, problems = _tiny_model_and_problems(tiny_model, tokenizer, tmp_path, 40)
    out = tmp_path / "head"
    rollouts = tmp_path / "head.rollouts.jsonl"
    cmd = [*CLI, "fit", "--model", str(folder), "--problems", str(problems), "--samples", "4", "--max-tokens", "64",
           "--concurrency", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not rollouts.exists() or len(rollouts.read_text().splitlines()) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("interrupted:"))
    assert re.search(r"interrupted: [\d,]+ of 160 rollouts are kept in .*head\.rollouts\.jsonl", line), line
    assert "run the same command to resume" in line and "--out" in line and not out.exists()


def test_the_less_used_fit_flags_reach_what_they_set_and_are_documented(tmp_path):
    """`--val-question-field`, `--val-answer-field`, `--val-selection-seed`, `--keep-problems`, `--grad-clip`,
    `--fit-seed` and `--top-k` each set what their help says, and docs/fitting.md explains every one."""
    from reasonmaxxer.cli import build_parser
    from reasonmaxxer.training.cli_config import FitConfig

    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"q": f"{i} + 1?", "a": str(i + 1)}) + "\n" for i in range(20)))
    argv = ["fit", "--rollouts", "r.jsonl", "--out", "x", "--val-problems", str(val), "--val-question-field", "q",
            "--val-answer-field", "a", "--val-selection-seed", "3", "--val-limit", "5", "--keep-problems", "7",
            "--grad-clip", "0.5", "--fit-seed", "11", "--top-k", "8"]
    config = FitConfig.from_args(build_parser("fit").parse_args(argv))
    fit_args = config.fit
    assert (fit_args.keep_problems, fit_args.grad_clip, fit_args.seed, fit_args.top_k) == (7, 0.5, 11, 8)
    picked = config.val.load()
    assert [p.question for p in picked.problems] != [f"{i} + 1?" for i in range(5)]  # shuffled by the seed
    assert all(p.answer == str(int(p.question.split(" ")[0]) + 1) for p in picked.problems)  # the fields given
    assert picked.problems == FitConfig.from_args(build_parser("fit").parse_args(argv)).val.load().problems
    docs = (Path(__file__).resolve().parents[1] / "docs" / "fitting.md").read_text()
    for flag in ("--val-question-field", "--val-answer-field", "--val-selection-seed", "--keep-problems",
                 "--grad-clip", "--fit-seed", "--top-k"):
        assert f"`{flag}" in docs, flag
