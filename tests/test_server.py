"""The OpenAI-compatible server, tested as users reach it: the official `openai` SDK and raw HTTP against a
real uvicorn server on a free local port, serving a tiny random model with a `head` adapter."""

import copy
import json
import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from reasonmaxxer.server.app import ServerState, create_app
from reasonmaxxer.server.settings import Settings
from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.async_engine import AsyncEngine
from reasonmaxxer.steering.engine import Engine

from conftest import free_port

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def _serve(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _state(tiny_model, tokenizer, step_delay: float = 0.0, **settings):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE
    step = "compiled" if settings.get("compile") else "fused"  # as server/backends.py builds it
    engine = Engine(tiny_model, tok, max_batch_size=8, name="tiny", step=step)
    if step_delay:  # a decode step as slow as a real model's, so a client can leave mid-generation
        fast_step = engine.step
        engine.step = lambda: (time.sleep(step_delay), fast_step())[1]
    engine.add_adapter(HeadAdapter.create(tiny_model, tok, "tiny-head", rank=8, tau=3.0, b_std=2.0, seed=1))
    s = Settings(**{"model": "tiny", "max_tokens_limit": 64, "max_n": 4, "max_stop": 4, "max_top_logprobs": 5,
                    **settings})
    return ServerState(s, AsyncEngine(engine, s.max_waiting), tok, "tiny"), s


def serving_tiny(tiny_model, tokenizer):
    """A real uvicorn server on the tiny model with its head adapter: yields its URL, stops it after (the body of a
    module-scoped fixture)."""
    state, settings = _state(tiny_model, tokenizer)
    server, thread, url = _serve(create_app(settings, state))
    yield url
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def live(tiny_model, tokenizer):
    state, settings = _state(tiny_model, tokenizer, step_delay=0.01)
    server, thread, url = _serve(create_app(settings, state))
    yield SimpleNamespace(url=url, state=state, client=openai.OpenAI(base_url=url + "/v1", api_key="none"))
    server.should_exit = True
    thread.join(10)


def _steering(obj) -> dict:
    return obj.model_extra["steering"]


def test_models_lists_base_and_adapters(live):
    assert [m.id for m in live.client.models.list()] == ["tiny", "tiny-head"]


def test_completion_and_chat_non_stream(live):
    c = live.client.completions.create(model="tiny", prompt="Natalia sold", max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 8
    rep = _steering(c.choices[0])
    assert rep["mode"] == "off" and rep["gate_fired"] == 0 and rep["tokens"] == 8
    assert c.usage.model_extra["steering"] == {"tokens": 8, "gate_fired": 0, "fire_rate": 0.0}
    chat = live.client.chat.completions.create(model="tiny-head", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=10, temperature=0)
    rep = _steering(chat.choices[0])
    assert rep["adapter"] == "tiny-head" and rep["mode"] == "gated" and rep["threshold"] == 3.0
    assert 0 <= rep["gate_fired"] <= rep["tokens"] == chat.usage.completion_tokens
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content is not None


def test_n_and_seed(live):
    kw = dict(model="tiny", prompt="How many", max_tokens=8, temperature=1.0, seed=5, n=3)
    a = live.client.completions.create(**kw)
    b = live.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.model_extra["steering"]["tokens"] == sum(_steering(c)["tokens"] for c in a.choices)


def test_streams_match_non_stream_and_end_with_reports(live):
    kw = dict(model="tiny", prompt="Weng earns", max_tokens=12, temperature=0)
    full = live.client.completions.create(**kw).choices[0].text
    chunks = list(live.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == "length" and _steering(last.choices[0])["tokens"] == 12
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    body = dict(model="tiny-head", messages=[{"role": "user", "content": "3x + 5"}], max_tokens=10, temperature=0)
    whole = live.client.chat.completions.create(**body).choices[0].message.content
    parts = list(live.client.chat.completions.create(**body, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole
    assert _steering(parts[-1].choices[0])["adapter"] == "tiny-head"


def test_extra_body_steering(live):
    base = dict(model="tiny", prompt="Natalia sold clips", max_tokens=16, temperature=0)
    off = live.client.completions.create(**base)
    never = live.client.completions.create(**base, extra_body={"steering": {"adapter": "tiny-head",
                                                                            "threshold": 1e9}})
    assert never.choices[0].text == off.choices[0].text and _steering(never.choices[0])["gate_fired"] == 0
    always = live.client.completions.create(**base, extra_body={"steering": {"adapter": "tiny-head", "mode": "always",
                                                                             "trace": True}})
    rep = _steering(always.choices[0])
    assert rep["gate_fired"] == rep["tokens"] == 16 and len(rep["trace"]) == 16
    assert always.choices[0].text != off.choices[0].text
    lp = live.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                             temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_gate_fired_counter_rises_by_the_reported_sum(live):
    before = _metric(live.url, "reasonmaxxer_gate_fired_tokens_total")
    tokens_before = _metric(live.url, "reasonmaxxer_generated_tokens_total")
    reported = generated = 0
    for mode in ("gated", "always", "off"):
        r = live.client.completions.create(model="tiny", prompt="Solve step by step", max_tokens=10, temperature=0,
                                           n=2, extra_body={"steering": {"adapter": "tiny-head", "mode": mode}})
        reported += r.usage.model_extra["steering"]["gate_fired"]
        generated += r.usage.completion_tokens
    assert reported > 0
    assert _metric(live.url, "reasonmaxxer_gate_fired_tokens_total") - before == reported
    assert _metric(live.url, "reasonmaxxer_generated_tokens_total") - tokens_before == generated


BAD = [
    ("completions", "{not json", 400, "not valid JSON"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("completions", {"model": "gpt-9", "prompt": "x"}, 404, "does not exist"),
    ("completions", {"model": "tiny", "prompt": "x", "steering": {"adapter": "nope"}}, 400, "unknown adapter"),
    ("completions", {"model": "tiny-head", "prompt": "x", "steering": {"mode": "sometimes"}}, 400, "mode"),
    ("completions", {"model": "tiny-head", "prompt": "x", "steering": {"threshold": -1}}, 400, "threshold"),
    ("completions", '{"model": "tiny-head", "prompt": "x", "steering": {"threshold": NaN}}', 400, "threshold"),
    ("completions", {"model": "tiny-head", "prompt": "x", "steering": {"treshold": 1}}, 400, "treshold"),
    ("completions", {"model": "tiny", "prompt": "clips " * 300, "max_tokens": 8}, 400, "maximum context length"),
    ("completions", {"model": "tiny", "prompt": "x", "max_tokens": 65}, 400, "at most 64"),
    ("completions", {"model": "tiny", "prompt": "x", "n": 5}, 400, "n is 5"),
    ("completions", {"model": "tiny", "prompt": "x", "logprobs": 6}, 400, "top logprobs"),
    ("completions", {"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop strings"),
    ("completions", {"model": "tiny", "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 6,
                          "logprobs": True}, 400, "top logprobs"),
]


@pytest.mark.parametrize("route, payload, status, message", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(live, route, payload, status, message):
    data = payload if isinstance(payload, str) else json.dumps(payload)
    r = httpx.post(f"{live.url}/v1/{route}", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] and "param" in err
    ok = httpx.post(f"{live.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_sdk_raises_its_own_exception_types(live):
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError):
        live.client.completions.create(model="tiny", prompt="x", extra_body={"steering": {"mode": "sometimes"}})


def test_dropped_stream_frees_its_slot(live):
    def running() -> int:
        return httpx.get(live.url + "/health").json()["running"]

    with httpx.stream("POST", live.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 60,
                                                                  "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert running() == 1
    deadline = time.time() + 10
    while running() and time.time() < deadline:
        time.sleep(0.05)
    assert running() == 0
    assert _metric(live.url, "reasonmaxxer_cancelled_requests_total") >= 1


@pytest.fixture(scope="module")
def admin(tiny_model, tokenizer, tmp_path_factory):
    """A server with adapter admin on, for directories under one root."""
    root = tmp_path_factory.mktemp("adapter-root")
    state, settings = _state(tiny_model, tokenizer, adapter_roots=[str(root)])
    server, thread, url = _serve(create_app(settings, state))
    yield SimpleNamespace(url=url, state=state, root=root, client=openai.OpenAI(base_url=url + "/v1", api_key="x"))
    server.should_exit = True
    thread.join(10)


def test_admin_refuses_a_corrupt_adapter_and_loads_a_good_one(admin, tiny_model):
    root = admin.root
    (root / "bad").mkdir()
    (root / "bad" / "adapter.json").write_text("{oops")
    r = httpx.post(admin.url + "/v1/adapters", json={"path": str(root / "bad")})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.post(admin.url + "/v1/completions", json={"model": "tiny-head", "prompt": "x",
                                                           "max_tokens": 2}).status_code == 200
    HeadAdapter.create(tiny_model, admin.state.tokenizer, "second", b_std=0.5).save(root / "second")
    r = httpx.post(admin.url + "/v1/adapters", json={"path": str(root / "second")})
    assert r.status_code == 201, r.text
    assert "second" in [m.id for m in admin.client.models.list()]
    assert [a["id"] for a in httpx.get(admin.url + "/v1/adapters").json()["data"]] == ["second", "tiny-head"]
    assert httpx.delete(admin.url + "/v1/adapters/second").status_code == 200
    assert httpx.delete(admin.url + "/v1/adapters/second").status_code == 404
    assert "second" not in [m.id for m in admin.client.models.list()]


def test_admin_is_off_without_an_adapter_root(live, tmp_path):
    for r in (httpx.post(live.url + "/v1/adapters", json={"path": str(tmp_path)}),
              httpx.delete(live.url + "/v1/adapters/tiny-head")):
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled", r.text
    assert "tiny-head" in [m.id for m in live.client.models.list()]


def test_admin_never_tells_what_exists_outside_its_roots(admin, tmp_path):
    (admin.root / "escape").symlink_to(tmp_path)
    paths = ("/root", "/root/.ssh", "/no/such/dir", str(admin.root / ".." / "x"), str(admin.root / "escape"))
    answers = [httpx.post(admin.url + "/v1/adapters", json={"path": p}).json()["error"] for p in paths]
    assert all(a["code"] == "outside_roots" for a in answers)
    assert len({a["message"] for a in answers}) == 1 and "/root" not in answers[0]["message"]
    long = httpx.post(admin.url + "/v1/adapters", json={"path": str(admin.root / ("x" * 5000))})
    assert long.status_code in (400, 403) and long.json()["error"]["message"], long.text
    assert httpx.post(admin.url + "/v1/adapters", json={"path": 5}).status_code == 400


def test_admin_opens_no_file_that_escapes_its_root_and_echoes_no_value_from_a_file(admin, tiny_model, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"format_version": "SECRET-123"}')
    folder = admin.root / "sneaky"
    HeadAdapter.create(tiny_model, admin.state.tokenizer, "sneaky", b_std=0.5).save(folder)
    (folder / "adapter.json").unlink()
    (folder / "adapter.json").symlink_to(secret)  # a file symlink out of the root: refused before it is opened
    outside = httpx.post(admin.url + "/v1/adapters", json={"path": str(folder)}).json()["error"]
    assert outside["code"] == "outside_roots" and "SECRET" not in outside["message"]
    (folder / "adapter.json").unlink()
    (folder / "adapter.json").write_text(secret.read_text())  # inside the root, a bad value: named, not echoed
    r = httpx.post(admin.url + "/v1/adapters", json={"path": str(folder)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter", r.text
    assert "format_version" in r.json()["error"]["message"] and "SECRET" not in r.text


def test_an_infinite_tau_reads_inf_everywhere(admin, tiny_model):
    folder = admin.root / "never"
    HeadAdapter.create(tiny_model, admin.state.tokenizer, "never", tau=float("inf"), b_std=0.5).save(folder)
    assert httpx.post(admin.url + "/v1/adapters", json={"path": str(folder)}).status_code == 201
    try:
        listed = {a["id"]: a for a in httpx.get(admin.url + "/v1/adapters").json()["data"]}
        r = httpx.post(admin.url + "/v1/completions", json={"model": "never", "prompt": "x", "max_tokens": 2})
        assert listed["never"]["tau"] == "inf" == r.json()["choices"][0]["steering"]["threshold"]
    finally:
        httpx.delete(admin.url + "/v1/adapters/never")


@pytest.mark.parametrize("name, message", [("a/b", "not allowed"), ("tiny", "served model's id"),
                                           (17, "not allowed"), ("", "not allowed")])
def test_admin_refuses_unsafe_adapter_names(admin, tiny_model, name, message):
    folder = admin.root / f"named-{abs(hash(str(name)))}"
    HeadAdapter.create(tiny_model, admin.state.tokenizer, "placeholder", b_std=0.5).save(folder)
    manifest = json.loads((folder / "adapter.json").read_text())
    (folder / "adapter.json").write_text(json.dumps({**manifest, "name": name}))
    r = httpx.post(admin.url + "/v1/adapters", json={"path": str(folder)})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("metrics_open", [True, False])
def test_auth(tiny_model, tokenizer, metrics_open):
    state, settings = _state(tiny_model, tokenizer, api_key="sekret", metrics_open=metrics_open)
    server, thread, url = _serve(create_app(settings, state))
    try:
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        two = httpx.get(url + "/v1/models", headers=[("Authorization", "Bearer wrong"),
                                                     ("Authorization", "Bearer sekret")])
        assert two.status_code == 400 and "more than one Authorization header" in two.json()["error"]["message"]
        assert httpx.get(url + "/v1/models", headers={"Host": "localhost"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(url + "/metrics").status_code == (200 if metrics_open else 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
        assert openai.OpenAI(base_url=url + "/v1", api_key="sekret").models.list().data[0].id == "tiny"
    finally:
        server.should_exit = True
        thread.join(10)


def test_non_stream_client_that_leaves_frees_its_slot(live):
    cancelled = _metric(live.url, "reasonmaxxer_cancelled_requests_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 64,
                                                       "ignore_eos": True, "n": 4}, timeout=0.3)
    deadline = time.time() + 10
    while httpx.get(live.url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(live.url + "/health").json()["running"] == 0
    assert _metric(live.url, "reasonmaxxer_cancelled_requests_total") - cancelled == 4


def test_full_queue_answers_503_before_any_stream_starts_and_a_request_larger_than_the_queue_400(
        tiny_model, tokenizer):
    state, settings = _state(tiny_model, tokenizer, max_waiting=1)
    gate, step = threading.Event(), state.engine.engine.step
    state.engine.engine.step = lambda: (gate.wait(), step())[1]  # the engine holds: submitted requests wait
    server, thread, url = _serve(create_app(settings, state))
    try:
        waiting = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                   kwargs={"json": {"model": "tiny", "prompt": "x", "max_tokens": 2}, "timeout": 30})
        waiting.start()
        deadline = time.time() + 10
        while state.engine.num_waiting < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        for stream in (False, True):
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "stream": stream})
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
            assert r.headers["Retry-After"] == "1"
        big = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "n": 2})
        assert big.status_code == 400 and "queues at most 1" in big.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200
        gate.set()
        waiting.join(30)
        text = httpx.get(url + "/metrics").text
        assert 'reasonmaxxer_responses_total{status="503"} 2.0' in text
        assert 'reasonmaxxer_rejected_requests_total{reason="overloaded"} 2.0' in text
        assert "reasonmaxxer_cancelled_requests_total 0.0" in text  # a rejection is not a cancellation
    finally:
        gate.set()
        server.should_exit = True
        thread.join(10)


def test_max_waiting_must_be_positive():
    with pytest.raises(ValueError, match="max_waiting"):
        Settings(max_waiting=0)


def test_python_client_reads_gate_reports(live):
    from reasonmaxxer.clients.client import SteeringClient

    client = SteeringClient(live.url)
    assert client.models() == ["tiny", "tiny-head"]
    base = client.complete("tiny", "Natalia sold", max_tokens=8, temperature=0)[0]
    assert base.steering["mode"] == "off" and base.gate_fired == 0 and base.completion_tokens == 8
    steered = client.chat("tiny", [{"role": "user", "content": "hi"}], adapter="tiny-head", mode="always",
                          max_tokens=6, temperature=0, n=2, seed=1)
    assert len(steered) == 2 and all(a.gate_fired == a.completion_tokens == 6 and a.fire_rate == 1.0 for a in steered)
    traced = client.complete("tiny-head", "x", trace=True, max_tokens=4, temperature=0)[0]
    assert len(traced.steering["trace"]) == 4
