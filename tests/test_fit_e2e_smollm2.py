"""A small real end-to-end fit on SmolLM2-135M-Instruct through the CLI: rollouts scored by the real
verifier, a `head` adapter fitted, then checked on its training rollouts: more probability than the base on
positive-advantage tokens at decision points, less on negative ones, small KL to the base elsewhere."""

import json
import random
import subprocess
import sys

from reasonmaxxer.models import load_model
from reasonmaxxer.steering.adapters import load_adapter
from reasonmaxxer.training.fit import FitArgs, head_diagnostics, prepare_items, select_problems
from reasonmaxxer.training.rollouts import load_rollouts


def _easy_problems(n: int = 16) -> list[dict]:
    """One-step arithmetic: SmolLM2 gets these right sometimes, which gives mixed outcomes. Asked for just the
    number: without it most answers run past 40 tokens (scored 0), and on an AVX2 CPU's bf16 numerics only 1
    of 16 problems came out mixed (no positive-advantage token at a decision point: the check read nan);
    with it 10 of 16 are mixed in bf16 and in fp32 there. The fit runs in float32: in bf16 on an AVX-512 CPU (the
    preferred dtype there) the positive shift of this 16-problem fit read -0.038, in fp32 it is positive."""
    rng, rows = random.Random(0), []
    for i in range(n):
        a, b, op = rng.randint(2, 9), rng.randint(2, 9), "+-*"[i % 3]
        rows.append({"q": f"What is {a} {op} {b}? Reply with just the number.",
                     "a": str({"+": a + b, "-": a - b, "*": a * b}[op])})
    return rows


def test_fit_head_end_to_end(tmp_path):
    problems = tmp_path / "easy.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in _easy_problems()))
    out = tmp_path / "adapter"
    cmd = [sys.executable, "-m", "reasonmaxxer.cli", "fit", "--model", "smollm2-135m-instruct",
           "--problems", str(problems), "--question-field", "q", "--answer-field", "a", "--samples", "8",
           "--max-new-tokens", "40", "--temperature", "0.8", "--verifier-fallbacks", "boxed,answer_is,last_number",
           "--kind", "head", "--rank", "8", "--lr", "0.0003", "--epochs", "3", "--accumulation", "4",
           "--warmup", "2", "--target-fire-rate", "0.05", "--dtype", "float32", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fire rate" in run.stdout and "wall time" in run.stdout and "log p" in run.stdout

    adapter = load_adapter(out)
    model, tok = load_model("smollm2-135m-instruct", dtype="float32")  # the fit's own dtype
    adapter.validate(model, tok)
    _, records = load_rollouts(out.with_suffix(".rollouts.jsonl"))
    assert len(records) == 8 * 16
    args = FitArgs(threshold=adapter.manifest.gate.tau, rank=8)
    items, _, _ = prepare_items(model, select_problems(records, 50), args, progress=False)
    d = head_diagnostics(model, items, adapter)
    assert d["logp_shift_positive"] > 0 > d["logp_shift_negative"], d
    assert d["anchor_kl"] < 0.05, d
    assert adapter.manifest.provenance["data"]["diagnostics"] == d
    meta = adapter.manifest
    assert meta.provenance["rollout_meta"]["model"]["fingerprint"] == meta.base_model.fingerprint
    assert 0 < meta.gate.measured_fire_rate < 0.2
