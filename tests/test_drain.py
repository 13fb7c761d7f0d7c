"""SIGTERM as a load balancer sends it, on `reasonmaxxer serve` (the real SmolLM2): new requests get 503
while running ones go on; a request that finishes within `--drain-timeout` ends normally; those still
running at the timeout end with a last error event that says the server is shutting down, then
`data: [DONE]`; the process exits 0 within the timeout plus a few seconds."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from conftest import start_server

pytestmark = pytest.mark.slow
DRAIN = 4.0


def _stream(url: str, max_tokens: int, out: list) -> None:
    body = {"model": "smollm2-135m-instruct", "prompt": "Count to a thousand:", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        out.extend(line for line in r.iter_lines() if line)


def test_sigterm_drains_then_ends_what_still_runs_and_exits_0():
    proc, url = start_server(["--drain-timeout", str(DRAIN), "--log-level", "info"], merged_output=True)
    try:
        short, long = [], [[] for _ in range(3)]
        threads = [threading.Thread(target=_stream, args=(url, 8, short))]
        threads += [threading.Thread(target=_stream, args=(url, 4000, out)) for out in long]
        for t in threads:
            t.start()
        while httpx.get(url + "/health").json()["running"] < 4:
            time.sleep(0.02)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(url + "/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        health = httpx.get(url + "/health")  # a load balancer takes this instance out of rotation
        assert health.status_code == 503 and health.json()["status"] == "draining"
        for t in threads:
            t.join(60)
        status = proc.wait(DRAIN + 10)
        took = time.monotonic() - sent
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 0 and took < DRAIN + 4, (status, took)
    # the drain says what it does, in the default log, before uvicorn's own shutdown lines
    start, cut, end = (log.index(x) for x in ("draining: 4 requests running", "drain timeout: ending 3 requests",
                                               "drained in"))
    assert start < cut < end < log.index("Shutting down"), log[-3000:]
    assert short[-1] == "data: [DONE]" and json.loads(short[-2][6:])["choices"][0]["finish_reason"] == "length"
    for out in long:
        assert out[-1] == "data: [DONE]", out[-3:]
        error = json.loads(out[-2][6:])["error"]
        assert error["code"] == "shutting_down" and "shutting down" in error["message"]
