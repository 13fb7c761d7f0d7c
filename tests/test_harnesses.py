"""lm-evaluation-harness and evalscope, installed from PyPI (deploy/install-harnesses.sh), run unchanged and
offline against a live `reasonmaxxer serve` (SmolLM2-135M-Instruct in float32 with its bundled adapter), on
tasks this test writes from local files: a few GSM8K train problems from ../shared/data (generate_until)
and a few multiple-choice items made here (loglikelihood, through `echo` prompt logprobs). Each harness runs
for the base model id and for the steered one. The base run's loglikelihoods must equal those the
transformers model computes on the same token ids.

The harnesses live in their own venvs (`.venv-lm-eval`, `.venv-evalscope` at the repo root, or the paths in
REASONMAXXER_LM_EVAL / REASONMAXXER_EVALSCOPE). Without them these tests skip, unless
REASONMAXXER_REQUIRE_HARNESSES=1 (CI sets it), where a missing harness fails.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
MODEL = "smollm2-135m-instruct"
ADAPTER = "smollm2-135m-instruct-svamp-head"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MC = [
    ("What is the capital of France?", ["Berlin", "Paris", "Rome", "Madrid"], 1),
    ("Which planet is known as the Red Planet?", ["Mars", "Venus", "Jupiter", "Saturn"], 0),
    ("What is 2 + 2?", ["3", "5", "4", "22"], 2),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
]

pytestmark = pytest.mark.slow


def _harness(env: str, venv: str, exe: str) -> Path:
    path = Path(os.environ.get(env) or ROOT / venv / "bin" / exe)
    if not path.exists():
        message = f"{path} is missing: run `bash deploy/install-harnesses.sh` (or set {env})"
        if os.environ.get("REASONMAXXER_REQUIRE_HARNESSES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(["--dtype", "float32", "--log-level", "warning"])
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tasks' data, written at test time into a temporary folder (never into the project)."""
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"no shared data at {GSM8K_TRAIN} (see ../shared/data/MANIFEST.md)")
    root = tmp_path_factory.mktemp("harness-data")
    rows = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()[:6]]
    (root / "gsm8k").mkdir()
    for name, part in (("train", rows[:2]), ("test", rows[2:])):
        (root / "gsm8k" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": k}) + "\n"
                                           for q, c, k in MC))
    (root / "mcq").mkdir()
    (root / "mcq" / "mc_val.jsonl").write_text("".join(
        json.dumps({"id": i, "question": q, **dict(zip("ABCD", c, strict=True)), "answer": "ABCD"[k]}) + "\n"
        for i, (q, c, k) in enumerate(MC)))
    return root


def _lm_eval_tasks(data: Path, folder: Path) -> Path:
    import yaml

    folder.mkdir(exist_ok=True)
    gsm8k = {
        "task": "rm_gsm8k", "dataset_path": "json", "output_type": "generate_until",
        "dataset_kwargs": {"data_files": {"train": str(data / "gsm8k/train.jsonl"),
                                          "test": str(data / "gsm8k/test.jsonl")}},
        "training_split": "train", "fewshot_split": "train", "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["Question:", "<|im_end|>"], "do_sample": False, "max_gen_toks": 48},
        "filter_list": [{"name": "flexible-extract", "filter": [
            {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    mc = {
        "task": "rm_mc", "dataset_path": "json", "output_type": "multiple_choice",
        "dataset_kwargs": {"data_files": {"test": str(data / "mc.jsonl")}}, "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    for task in (gsm8k, mc):
        (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))
    return folder


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, f"{cmd[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _lm_eval(exe: Path, url: str, model: str, tasks: Path, out: Path, tokenizer: str | None) -> dict:
    args = f"model={model},base_url={url}/v1/completions,num_concurrent=1,max_retries=1"
    if tokenizer:  # otherwise lm-eval detects our /tokenizer_info and /tokenize and uses them
        args += f",tokenizer_backend=huggingface,tokenizer={tokenizer}"
    _run([str(exe), "--model", "local-completions", "--model_args", args, "--include_path", str(tasks),
          "--tasks", "rm_gsm8k,rm_mc", "--output_path", str(out), "--log_samples", "--seed", "0"])
    results = json.loads(Path(glob.glob(f"{out}/**/results_*.json", recursive=True)[0]).read_text())["results"]
    samples = [json.loads(x) for f in glob.glob(f"{out}/**/samples_rm_mc_*.jsonl", recursive=True)
               for x in Path(f).read_text().splitlines()]
    return {"results": results, "mc": sorted(samples, key=lambda s: s["doc_id"])}


def _loglikelihoods(samples: list[dict]) -> list[list[float]]:
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def _reference(samples: list[dict]) -> list[list[float]]:
    """lm-eval's pairs scored by transformers in float32, tokenized as lm-eval does (`_encode_pair`)."""
    import torch

    from reasonmaxxer.models import load_model

    model, tok = load_model(MODEL, dtype="float32")
    out = []
    for s in samples:
        row = []
        for arg in s["arguments"].values():
            context, continuation = arg["arg_0"], arg["arg_1"]
            n = len(context) - len(context.rstrip())
            if n:
                context, continuation = context[:-n], context[-n:] + continuation
            whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
            ctx = len(tok(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            row.append(sum(float(logp[j - 1, whole[j]]) for j in range(ctx, len(whole))))
        out.append(row)
    return out


def _prompt_fired(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("reasonmaxxer_prompt_gate_fired_tokens_total{"))


def test_lm_eval_runs_unchanged_for_the_base_and_the_steered_model(server, data, tmp_path):
    from reasonmaxxer.models import resolve_model

    exe = _harness("REASONMAXXER_LM_EVAL", ".venv-lm-eval", "lm_eval")
    tasks = _lm_eval_tasks(data, tmp_path / "tasks")
    base = _lm_eval(exe, server, MODEL, tasks, tmp_path / "base", tokenizer=None)
    assert set(base["results"]) == {"rm_gsm8k", "rm_mc"} and len(base["mc"]) == len(MC)
    assert 0.0 <= base["results"]["rm_mc"]["acc,none"] <= 1.0
    assert "exact_match,flexible-extract" in base["results"]["rm_gsm8k"]
    got, want = _loglikelihoods(base["mc"]), _reference(base["mc"])
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=2e-3)  # float32 on both sides; differently shaped matmuls

    before = _prompt_fired(server)
    steered = _lm_eval(exe, server, ADAPTER, tasks, tmp_path / "steered", tokenizer=str(resolve_model(MODEL)))
    assert set(steered["results"]) == {"rm_gsm8k", "rm_mc"} and len(steered["mc"]) == len(MC)
    assert _prompt_fired(server) > before  # the gate fired inside the scored prompts
    moved = [abs(a - b) for s, g in zip(_loglikelihoods(steered["mc"]), got, strict=True)
             for a, b in zip(s, g, strict=True)]
    assert max(moved) > 1e-3  # and moved their loglikelihoods


def _evalscope(exe: Path, url: str, model: str, data: Path, out: Path) -> dict:
    datasets = {"gsm8k": {"local_path": str(data / "gsm8k"), "subset_list": ["default"], "few_shot_num": 0},
                "general_mcq": {"local_path": str(data / "mcq"), "subset_list": ["mc"], "prompt_template":
                                "Answer with 'ANSWER: [LETTER]' where [LETTER] is one of {letters}.\n\n"
                                "{question}\n\n{choices}"}}
    generation = {"max_tokens": 48, "temperature": 0.0, "seed": 7, "stream": True, "stop_seqs": ["<|im_end|>"],
                  "logprobs": True, "top_logprobs": 2, "timeout": 300, "retries": 1}
    _run([str(exe), "eval", "--model", model, "--eval-type", "openai_api", "--api-url", f"{url}/v1",
          "--api-key", "EMPTY", "--datasets", "gsm8k", "general_mcq", "--dataset-args", json.dumps(datasets),
          "--generation-config", json.dumps(generation), "--eval-batch-size", "2", "--limit", "4",
          "--work-dir", str(out), "--no-timestamp"])
    reports = {}
    for f in glob.glob(f"{out}/reports/*/*.json"):
        report = json.loads(Path(f).read_text())
        reports[report["dataset_name"]] = report["metrics"][0]
    return reports


def test_evalscope_runs_unchanged_on_the_chat_route_for_the_base_and_the_steered_model(server, data, tmp_path):
    exe = _harness("REASONMAXXER_EVALSCOPE", ".venv-evalscope", "evalscope")
    for model in (MODEL, ADAPTER):
        reports = _evalscope(exe, server, model, data, tmp_path / model)
        assert set(reports) == {"gsm8k", "general_mcq"}, reports
        for metric in reports.values():
            assert metric["num"] == 4 and 0.0 <= metric["score"] <= 1.0
