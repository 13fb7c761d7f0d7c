"""The `reasonmaxxer` console script, run as a user would (a real subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reasonmaxxer.models import load_model
from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.training.cli_config import (
    EngineConfig,
    FitConfig,
    ProbeBranchesConfig,
    ProblemSelection,
    RolloutsConfig,
)
from reasonmaxxer.training.config import FitArgs, ProbeConfig, RolloutConfig

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
    from reasonmaxxer.training.cli_config import FitConfig, name_of_folder

    parser = build_parser()
    args = parser.parse_args(["fit", "--rollouts", "r.jsonl", "--out", "out/smol-svamp-head"])
    assert FitConfig.from_args(args).fit.name == "smol-svamp-head"
    args = parser.parse_args(["fit", "--rollouts", "r.jsonl", "--out", "out/x", "--name", "mine"])
    assert FitConfig.from_args(args).fit.name == "mine"
    assert name_of_folder("runs/my adapter (v2)") == "my-adapter-v2-" and name_of_folder("/") == "adapter"


def test_every_subcommand_is_one_module_with_add_arguments_and_main():
    import importlib

    from reasonmaxxer.cli import COMMANDS

    for name, (module, text) in COMMANDS.items():
        commands = importlib.import_module(module)
        assert callable(commands.add_arguments) and callable(commands.main), name
        assert text and "\n" not in text, name


def test_the_top_level_help_imports_no_torch():
    code = ("import sys\nfrom reasonmaxxer.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rollouts" in out.stdout and out.stdout.splitlines()[-1] == "False", out.stdout[-2000:]


def _parsed(argv: list[str]):
    import argparse

    from reasonmaxxer.cli import build_parser

    return build_parser(argv[0]).parse_args(argv, argparse.Namespace(argv=argv))


@pytest.fixture()
def recipe_calls(monkeypatch) -> list:
    """The presets the paper recipe is applied to, one per call."""
    from reasonmaxxer.training import recipe

    calls = []
    monkeypatch.setitem(recipe.RECIPES, "paper", lambda preset: calls.append(preset) or recipe.paper(preset))
    return calls


def test_rollouts_config_is_built_from_its_flags_with_the_recipe_applied_once(recipe_calls):
    argv = ["rollouts", "--model", "m", "--problems", "p.jsonl", "--limit", "3", "--selection-seed", "5", "--recipe",
            "paper", "--samples", "4", "--backend", "vllm", "--vllm-args", '{"enforce_eager": true}', "--concurrency",
            "5", "--stop", "X", "--out", "r.jsonl"]
    engine = EngineConfig("m", None, "auto", "vllm", False, 5, {"enforce_eager": True})
    sampling = RolloutConfig(samples=4, temperature=0.6, top_p=0.95, prompt_style="paper", concurrency=5, stop=("X",))
    problems = ProblemSelection("p.jsonl", limit=3, seed=5)
    assert RolloutsConfig.from_args(_parsed(argv)) == RolloutsConfig(engine, problems, sampling, "boxed",
                                                                     Path("r.jsonl"), ("reasonmaxxer", *argv))
    assert len(recipe_calls) == 1


def test_fit_config_is_built_from_its_flags_with_the_recipe_applied_once(recipe_calls):
    argv = ["fit", "--rollouts", "r.jsonl", "--out", "ad/head", "--recipe", "paper", "--fit-seed", "3", "--seed", "2",
            "--kind", "lora", "--threshold", "calibrate", "--val-problems", "v.jsonl", "--val-limit", "8",
            "--tau-sweep", "1.0,1.4", "--fast"]
    fit = FitArgs(name="head", kind="lora", seed=3, threshold=None, keep_problems=50, trim=0.8, adv_clip=2.5,
                  kl_weight=0.2, order="curriculum", lr=1e-4, epochs=2, max_steps=149, warmup=50, warmup_cap=False,
                  accumulation=8, grad_clip=1.0, checkpoint_every=0.15, autocast="bfloat16", rank=32, lora_alpha=64)
    rollouts = RolloutsConfig(EngineConfig("smollm2-135m-instruct", fast=True), ProblemSelection(None),
                              RolloutConfig(seed=2, prompt_style="paper"), "boxed", Path("r.jsonl"),
                              ("reasonmaxxer", *argv))
    val = ProblemSelection("v.jsonl", limit=8)
    assert FitConfig.from_args(_parsed(argv)) == FitConfig(rollouts, fit, "ad/head", val, 2, "gated", "transformers",
                                                           None, (1.0, 1.4), None)
    assert len(recipe_calls) == 1


def test_probe_branches_config_is_built_from_its_flags():
    argv = ["probe-branches", "--model", "m", "--rollouts", "r.jsonl", "--out", "pb", "--tau", "2.0", "--concurrency",
            "7", "--backend", "transformers", "--wrong", "3"]
    assert ProbeBranchesConfig.from_args(_parsed(argv)) == ProbeBranchesConfig(
        EngineConfig("m", backend="transformers", concurrency=7), "r.jsonl", "pb", 3, 40, 2,
        ProbeConfig(tau=2.0, concurrency=7), "boxed")
