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


def _stream(url: str, max_tokens: int, out: list, **extra) -> None:
    body = {"model": "smollm2-135m-instruct", "prompt": "Count to a thousand:", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, **extra}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        out.extend(line for line in r.iter_lines() if line)


def test_sigterm_drains_then_ends_what_still_runs_and_exits_0():
    proc, url = start_server(["--drain-timeout", str(DRAIN), "--log-level", "info"], merged_output=True)
    try:
        short, long = [], [[] for _ in range(3)]
        threads = [threading.Thread(target=_stream, args=(url, 8, short))]
        threads += [threading.Thread(target=_stream, args=(url, 4000, out)) for out in long[:2]]
        counted = {"stream_options": {"include_usage": True}, "logprobs": 0}
        threads.append(threading.Thread(target=_stream, args=(url, 4000, long[2]), kwargs=counted))
        for t in threads:
            t.start()
        while httpx.get(url + "/health").json()["running"] < 4:
            time.sleep(0.02)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(url + "/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert int(refused.headers["Retry-After"]) > 0
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
    # a stream cut by the drain: its usage chunk (before the error event) counts the tokens it received
    chunks = [json.loads(line[6:]) for line in long[2][:-2]]
    received = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks if c["choices"])
    assert received > 0 and chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == received == chunks[-1]["usage"]["steering"]["tokens"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_the_drain_ends_every_stream_and_exits_within_2_s(sig):
    proc, url = start_server(["--drain-timeout", "60", "--log-level", "info"], merged_output=True)
    try:
        outs = [[] for _ in range(3)]
        threads = [threading.Thread(target=_stream, args=(url, 4000, out)) for out in outs]
        for t in threads:
            t.start()
        while httpx.get(url + "/health").json()["running"] < 3:
            time.sleep(0.02)
        proc.send_signal(sig)
        time.sleep(0.5)  # draining: the streams go on
        assert proc.poll() is None
        second = time.monotonic()
        proc.send_signal(sig)
        status = proc.wait(30)
        took = time.monotonic() - second
        for t in threads:
            t.join(30)
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 2.0, took
    # SIGTERM: killed by it (a shell says 143); SIGINT: Ctrl-C's exit 130 (`reasonmaxxer serve: interrupted`)
    assert status == {signal.SIGTERM: -signal.SIGTERM, signal.SIGINT: 130}[sig], (status, log[-3000:])
    assert "terminate called" not in log and "Traceback" not in log, log[-3000:]
    assert "second signal: ending every request now" in log
    for out in outs:
        assert out[-1] == "data: [DONE]", out[-3:]
        assert json.loads(out[-2][6:])["error"]["code"] == "shutting_down"
