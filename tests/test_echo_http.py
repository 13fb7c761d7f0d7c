"""`echo` and the tokenizer routes over HTTP, on a real uvicorn server with a tiny model and a `head` adapter:
OpenAI's legacy logprobs shape, max_tokens 0, batches of text and token-id prompts, streams, the steered
model's prompt logprobs, vLLM's /tokenize, /detokenize and /tokenizer_info, and their errors."""

import json
from types import SimpleNamespace

import httpx
import pytest
import torch
from test_server import _serve, _state

from reasonmaxxer.server.app import create_app

TEXT = "Natalia sold clips to 48 of her friends"


@pytest.fixture(scope="module")
def live(tiny_model, tokenizer):
    state, settings = _state(tiny_model, tokenizer)
    server, thread, url = _serve(create_app(settings, state))
    yield SimpleNamespace(url=url, state=state, tok=state.tokenizer)
    server.should_exit = True
    thread.join(10)


def _post(live, route: str, payload) -> httpx.Response:
    return httpx.post(f"{live.url}{route}", json=payload, timeout=60)


def _base_logprobs(model, ids) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]


def test_echo_max_tokens_0_returns_the_prompt_and_its_base_logprobs(live, tiny_model):
    r = _post(live, "/v1/completions", {"model": "tiny", "prompt": TEXT, "echo": True, "max_tokens": 0,
                                        "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = live.tok(TEXT)["input_ids"]
    lp = choice["logprobs"]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert lp["tokens"] == [live.tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(_base_logprobs(tiny_model, ids), abs=1e-4)
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert r.json()["usage"]["completion_tokens"] == 0


def test_echo_with_generation_batched_token_id_prompts_and_n(live, tiny_model):
    prompts = [live.tok(TEXT)["input_ids"], live.tok("How many clips")["input_ids"]]
    r = _post(live, "/v1/completions", {"model": "tiny", "prompt": prompts, "echo": True, "max_tokens": 3,
                                        "logprobs": 2, "n": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert len(choices) == 4
    for c in choices:
        ids = prompts[c["index"] // 2]
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 3
        assert c["text"].startswith(live.tok.decode(ids))
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(_base_logprobs(tiny_model, ids), abs=1e-4)
        assert all(v is not None for v in lp["token_logprobs"][len(ids):])


def test_a_steered_model_id_scores_the_prompt_steered_and_reports_where_it_fired(live, tiny_model):
    ids = live.tok(TEXT)["input_ids"]
    payload = {"model": "tiny-head", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0,
               "steering": {"mode": "always"}}
    steered = _post(live, "/v1/completions", payload).json()["choices"][0]
    base = _post(live, "/v1/completions", {**payload, "steering": {"mode": "always", "logprobs": "base"}}).json()
    report = steered["steering"]
    assert report["prompt_gate_fired"] == report["prompt_tokens_scored"] == len(ids) - 1
    assert report["tokens"] == 0 and report["mode"] == "always"
    want = _base_logprobs(tiny_model, ids)
    assert base["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert steered["logprobs"]["token_logprobs"][1:] != pytest.approx(want, abs=1e-3)
    inf = _post(live, "/v1/completions", {**payload, "steering": {"threshold": 1e9}}).json()["choices"][0]
    assert inf["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert inf["steering"]["prompt_gate_fired"] == 0
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'reasonmaxxer_prompt_gate_fired_tokens_total{adapter="tiny-head",mode="always",model="tiny"}' in metrics


def test_echo_streams_the_prompt_first(live):
    with httpx.stream("POST", f"{live.url}/v1/completions", json={
            "model": "tiny", "prompt": TEXT, "echo": True, "max_tokens": 2, "logprobs": 0, "stream": True}) as r:
        assert r.status_code == 200
        lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    first = lines[0]["choices"][0]
    assert first["text"] == TEXT and first["logprobs"]["token_logprobs"][0] is None
    assert lines[-1]["choices"][0]["finish_reason"] is not None


BAD = [
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "only allowed with echo"),
    ("/v1/completions", {"model": "tiny", "prompt": [10**9], "max_tokens": 1}, "out of range"),
    ("/v1/completions", {"model": "tiny", "prompt": [-1], "max_tokens": 1}, "out of range"),
    ("/v1/completions", {"model": "tiny", "prompt": [True], "max_tokens": 1}, "prompt"),
    ("/tokenize", {"model": "tiny"}, "prompt"),
    ("/tokenize", {"prompt": "x", "model": "gpt-9"}, "does not exist"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": True,
                   "continue_final_message": True}, "cannot both"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
    ("/detokenize", {"tokens": [10**6]}, "out of range"),
]


@pytest.mark.parametrize("route, payload, message", BAD)
def test_bad_input_is_refused_in_openais_shape(live, route, payload, message):
    r = _post(live, route, payload)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert message in err["message"] and err["type"] and "param" in err
    assert _post(live, "/tokenize", {"prompt": "x"}).status_code == 200  # still serving


def test_tokenize_and_detokenize_round_trip(live):
    t = _post(live, "/tokenize", {"model": "tiny", "prompt": TEXT, "return_token_strs": True}).json()
    assert t["tokens"] == live.tok(TEXT)["input_ids"] and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == 256 and t["token_strs"] == live.tok.convert_ids_to_tokens(t["tokens"])
    assert _post(live, "/detokenize", {"tokens": t["tokens"]}).json() == {"prompt": TEXT}
    messages = [{"role": "user", "content": "How many clips?"}]
    chat = _post(live, "/tokenize", {"model": "tiny-head", "messages": messages}).json()
    done = _post(live, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 1}).json()
    assert chat["count"] == done["usage"]["prompt_tokens"]
    info = httpx.get(f"{live.url}/tokenizer_info").json()
    assert info["tokenizer_class"] == type(live.tok).__name__ and info["chat_template"] == live.tok.chat_template
    assert "name_or_path" not in info and info["eos_token"] == "</s>"


def test_tokenizer_routes_are_behind_the_api_key(tiny_model, tokenizer):
    state, settings = _state(tiny_model, tokenizer, api_key="sekret")
    server, thread, url = _serve(create_app(settings, state))
    try:
        for method, route in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")):
            r = httpx.request(method, url + route, json={"prompt": "x", "tokens": [1]})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.post(url + "/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


def test_echo_of_a_batch_of_text_prompts_as_lm_eval_sends_without_a_tokenizer(live, tiny_model):
    texts = [TEXT, "How many clips"]
    r = _post(live, "/v1/completions", {"model": "tiny", "prompt": texts, "echo": True, "max_tokens": 1,
                                        "logprobs": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    for c in sorted(r.json()["choices"], key=lambda c: c["index"]):
        ids = live.tok(texts[c["index"]])["input_ids"]
        lp = c["logprobs"]
        assert c["text"].startswith(texts[c["index"]]) and len(lp["token_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][1:len(ids)] == pytest.approx(_base_logprobs(tiny_model, ids), abs=1e-4)
        # lm-eval's is_greedy compares each logprob with the max of its top_logprobs, exactly
        assert all(v <= max(top.values()) for v, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:],
                                                            strict=True))
