"""One bad request never touches another, and the server says exactly what it did: a bad request in the
middle of a running batch, a request the engine cannot run, body limits, tokenizing off the event loop,
500s counted, the OpenAPI document, 405 with Allow, HEAD /health, the completions default max_tokens."""

import json
import threading
import time

import httpx
import pytest
from test_server import _metric, _serve, _state

from reasonmaxxer.server.app import create_app
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request
from reasonmaxxer.steering.sampling import SamplingParams

GOOD = ["Natalia sold clips", "Solve step by step.", "How many"]


@pytest.fixture(scope="module")
def live(tiny_model, tokenizer):
    state, settings = _state(tiny_model, tokenizer, step_delay=0.02, max_body_bytes=1 << 20)
    server, thread, url = _serve(create_app(settings, state))
    yield url, state
    server.should_exit = True
    thread.join(10)


def _greedy(url: str, prompt: str, results: dict) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                                  "temperature": 0, "ignore_eos": True}, timeout=60)
    results[prompt] = r.json()["choices"][0]["text"]


BAD = [{"model": "tiny", "prompt": [10**9], "max_tokens": 2}, {"model": "tiny", "prompt": [True], "max_tokens": 2},
       {"model": "tiny", "prompt": "x", "top_k": 2**63, "max_tokens": 2},
       {"model": "tiny", "prompt": "a\ud800", "max_tokens": 2},
       {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}]


def test_bad_requests_mid_batch_leave_every_other_request_token_for_token(live):
    url, _ = live
    alone: dict = {}
    for p in GOOD:
        _greedy(url, p, alone)
    together: dict = {}
    threads = [threading.Thread(target=_greedy, args=(url, p, together)) for p in GOOD]
    for t in threads:
        t.start()
    time.sleep(0.1)  # the batch is running
    for body in BAD:
        route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = httpx.post(url + route, content=json.dumps(body), headers={"content-type": "application/json"})
        if body.get("top_k"):  # a top_k beyond the vocabulary is no filter: served, not refused
            assert r.status_code == 200, r.text
            continue
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], r.text
    for t in threads:
        t.join(60)
    assert together == alone


def test_a_request_the_engine_cannot_prefill_ends_alone(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    good = [Request(tokenizer(p)["input_ids"], SamplingParams(max_tokens=8, temperature=0)) for p in GOOD]
    want = [c.token_ids for c in engine.generate(good)]
    broken = Request(tokenizer("x")["input_ids"], SamplingParams(max_tokens=8, temperature=1.0))
    broken.sampling.temperature = float("nan")  # past validation: sampling fails on this row only
    fresh = [Request(r.prompt_ids, r.sampling) for r in good]
    out = engine.generate([fresh[0], broken, fresh[1], fresh[2]])
    assert out[1].finish_reason == "error" and out[1].token_ids == []
    assert [out[0].token_ids, out[2].token_ids, out[3].token_ids] == want


def test_a_body_over_the_limit_is_413_before_parsing_and_chunked_too(live):
    url, _ = live
    big = json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)})
    r = httpx.post(url + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():
        for i in range(0, len(big), 1 << 16):
            yield big[i:i + (1 << 16)].encode()

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert 'reasonmaxxer_responses_total{status="413"}' in httpx.get(url + "/metrics").text
    ok = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_a_large_prompt_is_tokenized_off_the_event_loop(live):
    url, _ = live
    done: list = []
    prompt = "Natalia sold clips to 48 of her friends. " * 20000  # ~0.8 MB: seconds of tokenizing
    t = threading.Thread(target=lambda: done.append(httpx.post(url + "/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": 2})))
    t.start()
    time.sleep(0.2)
    slowest = 0.0
    while t.is_alive():
        start = time.perf_counter()
        assert httpx.get(url + "/health").status_code == 200
        slowest = max(slowest, time.perf_counter() - start)
        time.sleep(0.05)
    assert done[0].status_code == 400 and "maximum context length" in done[0].json()["error"]["message"]
    assert slowest < 0.5


def test_an_unexpected_error_is_a_counted_500_in_openais_shape(tiny_model, tokenizer):
    state, settings = _state(tiny_model, tokenizer)

    def broken(*_a, **_k):
        raise RuntimeError("boom")

    state.engine.engine.prompt_logprobs_pieces = broken
    server, thread, url = _serve(create_app(settings, state))
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "echo": True, "max_tokens": 0,
                                                      "logprobs": 0})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert 'reasonmaxxer_responses_total{status="500"} 1.0' in httpx.get(url + "/metrics").text
        assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 1}).status_code \
            == 200
    finally:
        server.should_exit = True
        thread.join(10)


def test_openapi_describes_openai_errors_and_the_limits(live):
    url, state = live
    doc = httpx.get(url + "/openapi.json").json()
    ops = [op for path in doc["paths"].values() for op in path.values()]
    assert all("422" not in op["responses"] for op in ops)
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {"400", "413", "503"} <= set(completions)
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["n"]["maximum"] == state.settings.max_n and props["max_tokens"]["maximum"] == 64


def test_405_says_allow_and_head_health_works(live):
    url, _ = live
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and r.json()["error"]["message"]
    assert httpx.head(url + "/health").status_code == 200


def test_nan_and_the_completions_default_max_tokens(tiny_model, tokenizer):
    state, settings = _state(tiny_model, tokenizer, max_tokens_limit=8)
    server, thread, url = _serve(create_app(settings, state))
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8  # 16 clamped to the limit
        nan = httpx.post(url + "/v1/completions", content='{"model": "tiny", "prompt": "x", "temperature": NaN}',
                         headers={"content-type": "application/json"})
        assert nan.status_code == 400 and "finite" in nan.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_dropped_stream_counts_the_tokens_it_generated(live):
    url, _ = live
    before = _metric(url, "reasonmaxxer_generated_tokens_total")
    with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 60,
                                                             "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(10)]
    assert len([x for x in got if x.startswith("data: {")]) >= 5
    deadline = time.time() + 10
    while httpx.get(url + "/health").json()["running"]:
        assert time.time() < deadline
        time.sleep(0.02)
    assert 5 <= _metric(url, "reasonmaxxer_generated_tokens_total") - before < 60

