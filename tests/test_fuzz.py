"""Property-based fuzzing of the inference routes, plus explicit regression cases a fuzzer rarely generates.

Contract under test: whatever a client sends to POST /v1/completions, POST /v1/chat/completions, POST
/tokenize, POST /detokenize, GET /v1/models or GET /health, the server answers without a 5xx (in process,
an exception escaping the app counts as one: a real server would answer it 500); every 4xx body is
OpenAI's error object `{"error": {"message": non-empty str, "type": str, "param": str|null,
"code": str|int|null}}`; every 200 event stream ends with `data: [DONE]`; and the server keeps serving.

The fuzz half is schemathesis over the app's own OpenAPI schema, called in process (ASGI; schemathesis's
client runs the app's lifespan, which sets `app.state.server`), in both generation modes: positive bodies
(they fit the schema) and negative ones (they break it), about 1,650 cases in all (1,000 asserted). A
generated `model` is almost never a served id and a generated `max_tokens` almost always over the limit, so
most POST bodies are given a served model id and a 1-8 token budget, many are also brought within the
server's limits, and some of those get one field set to an edge value (past int64, lone surrogates, wrong
JSON types): those reach tokenizing, steering, the engine and streaming (see `_cases`). Generation is cheap:
the tiny random Llama with `max_tokens_limit` 8; the file runs in about a minute on one core.

The regression half sends raw JSON text (lone surrogates as `\\ud800` escapes, `NaN`, integers over 2**63,
more choices than the queue holds) to a real uvicorn server and expects a 4xx in OpenAI's shape, and a 200
for a valid request sent right after.
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from test_server import _serve, _state

from reasonmaxxer.server.app import create_app

MAX_TOKENS = 8  # the fuzzed server's max_tokens_limit: keeps every generation short
SERVED = ("tiny", "tiny-head")

# (method, path, examples per generation mode); the GET routes take no input, so one case each is all there is.
OPERATIONS = [
    ("POST", "/v1/completions", 250),
    ("POST", "/v1/chat/completions", 250),
    ("POST", "/tokenize", 160),
    ("POST", "/detokenize", 160),
    ("GET", "/v1/models", 5),
    ("GET", "/health", 5),
]
MIN_TOTAL_CASES = 1000
CASES: Counter = Counter()  # generated cases by (method, path, mode), filled as the fuzz tests run
STATUSES: Counter = Counter()  # their answers by (path, status)


def assert_openai_error(status: int, text: str) -> None:
    """A 4xx body must be OpenAI's error object."""
    where = f"HTTP {status}: {text[:500]}"
    body = json.loads(text)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), where
    err = body["error"]
    assert isinstance(err.get("message"), str) and err["message"], where
    assert isinstance(err.get("type"), str) and err["type"], where
    assert "param" in err and "code" in err, where
    assert err["param"] is None or isinstance(err["param"], str), where
    assert err["code"] is None or isinstance(err["code"], (str, int)), where


def check_response(status: int, content_type: str, text: str, cut_short: bool = False) -> None:
    """No 5xx; 4xx in OpenAI's shape; a complete 200 event stream ends with [DONE]; a 200 JSON body parses."""
    assert status < 500, f"HTTP {status}: {text[:500]}"
    if 400 <= status < 500:
        assert_openai_error(status, text)
    elif status == 200 and content_type.startswith("text/event-stream") and not cut_short:
        assert text.rstrip().endswith("data: [DONE]"), f"the stream did not end with [DONE]: ...{text[-300:]}"
    elif status == 200 and content_type.startswith("application/json"):
        json.loads(text)


# -- the fuzz half ---------------------------------------------------------------------------------------------
@pytest.fixture
def fuzz_schema(tiny_model, tokenizer):
    """A fresh app per test: schemathesis's pytest plugin ends every ASGI lifespan at test teardown, and the
    lifespan's end closes the state's engine for good."""
    state, s = _state(tiny_model, tokenizer)
    state.settings = s.model_copy(update={"max_tokens_limit": MAX_TOKENS})
    app = create_app(state.settings, state)
    # Streams are read whole (the default cuts them at 20 events, which would hide a missing [DONE]).
    config = SchemathesisConfig.from_dict({"max-stream-events": 10_000})
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    assert app.state.server is state, "the in-process client did not run the app's lifespan"
    return schema


# What the served branch drops or bounds so that a generated body can pass the server's own limits.
_REFUSED = ("frequency_penalty", "presence_penalty", "logit_bias", "best_of", "suffix", "tools", "response_format")
_STEERING = st.sampled_from([None, {"mode": "off"}, {"mode": "always", "trace": True}, {"threshold": 2.5, "top_k": 3},
                             {"adapter": "tiny-head", "mode": "random", "rate": 0.5}, {"logprobs": "base"}])


def _bounded(value, low: int, high: int):
    """An integer clamped into [low, high]; anything else (a wrong type the server must refuse) as it is."""
    return max(low, min(value, high)) if isinstance(value, int) and not isinstance(value, bool) else value


def _short(value):
    """Strings cut to 40 characters, lists to 3 items (a prompt well inside the tiny model's 256-token context),
    integers (token ids) into the tiny vocabulary."""
    if isinstance(value, str):
        return value[:40]
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) % 300
    if isinstance(value, list):
        return [_short(v) for v in value[:3]]
    if isinstance(value, dict):
        return {k: _short(v) for k, v in value.items()}
    return value


def _servable(draw, body: dict, path: str) -> dict:
    """The body within the server's limits: refused fields dropped, counts bounded, texts short, steering valid."""
    body = {k: v for k, v in body.items() if k not in _REFUSED}
    for key in ("prompt", "messages", "stop"):
        if key in body:
            body[key] = _short(body[key])
    body["n"] = _bounded(body.get("n", 1), 1, 4)
    for key in ("logprobs", "top_logprobs"):
        if key in body and not isinstance(body[key], bool):
            body[key] = _bounded(body[key], 0, 5)
    if isinstance(body.get("stop"), list):
        body["stop"] = [x for x in body["stop"] if x] or None
    if not body.get("stream"):
        body.pop("stream_options", None)
    body["steering"] = draw(_STEERING)
    if path == "/v1/chat/completions" and body.get("top_logprobs") is not None:
        body["logprobs"] = True
    return body


# The "nasty" branch: one field of a servable body gets an edge value (integers past int64, extreme floats,
# lone surrogates, empty and wrong JSON types). NaN and infinities cannot go this way (the client's JSON
# encoder refuses them): the regressions send them as raw text.
_NASTY = st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, -1, 0, 1e308, 5e-324, -0.0, "\ud800", "a\udfffb", "",
                          True, None, [], {}, [None], {"": 0}, [2**63]])
_SAMPLING_FIELDS = [("n",), ("seed",), ("top_k",), ("top_p",), ("temperature",), ("min_p",), ("max_tokens",),
                    ("logprobs",), ("top_logprobs",), ("stop",), ("user",), ("model",), ("ignore_eos",), ("stream",),
                    ("stream_options", "include_usage"), ("steering", "threshold"), ("steering", "top_k"),
                    ("steering", "rate"), ("steering", "adapter"), ("steering", "mode")]
_NASTY_FIELDS = {
    "/v1/completions": [*_SAMPLING_FIELDS, ("prompt",), ("prompt", 0), ("echo",)],
    "/v1/chat/completions": [*_SAMPLING_FIELDS, ("messages",), ("messages", 0, "content"), ("messages", 0, "role")],
    "/tokenize": [("prompt",), ("model",), ("add_special_tokens",), ("return_token_strs",), ("messages", 0, "content")],
    "/detokenize": [("tokens",), ("tokens", 0), ("model",)],
}


def _fits(target, key) -> bool:
    return isinstance(target, dict) if isinstance(key, str) else isinstance(target, list) and len(target) > key


def _poke(body: dict, where: tuple, value) -> None:
    """Set body[where[0]][where[1]]... = value, making dicts on the way; a list index must already exist."""
    target = body
    for key in where[:-1]:
        if isinstance(key, str) and isinstance(target, dict) and not isinstance(target.get(key), (dict, list)):
            target[key] = {}
        if not _fits(target, key):
            return
        target = target[key]
    if _fits(target, where[-1]):
        target[where[-1]] = value


@st.composite
def _cases(draw, operation, mode: GenerationMode):
    """A schemathesis case. A POST dict body goes as generated ("raw"), or gets a served model id and a 1-8
    token budget ("served"), or is also brought within the server's limits ("servable"), or is that with one
    field set to an edge value ("nasty"). Hypothesis draws the first choice most often, and shrinks towards it."""
    case = draw(operation.as_strategy(generation_mode=mode))
    branch = draw(st.sampled_from(["servable", "nasty", "served", "raw"]))
    if operation.method.upper() != "POST" or not isinstance(case.body, dict) or branch == "raw":
        return case
    body = copy.deepcopy(case.body)
    body["model"] = draw(st.sampled_from(SERVED))
    if operation.path.startswith("/v1/"):
        body["max_tokens"] = draw(st.integers(1, MAX_TOKENS))
        body.pop("max_completion_tokens", None)
        if branch != "served":
            body = _servable(draw, body, operation.path)
    if branch == "nasty":
        _poke(body, draw(st.sampled_from(_NASTY_FIELDS[operation.path])), draw(_NASTY))
    case.body = body
    return case


def _raised_in_schemathesis(e: BaseException) -> bool:
    """schemathesis validates a case on the client side before sending it, and its validator cannot encode a
    lone surrogate: such a case never reached the app."""
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "/schemathesis/" in tb.tb_frame.f_code.co_filename


def _call_raw(case) -> None:
    """Send the case's body as JSON text (lone surrogates escaped, as a client sends them) straight to the app."""
    from starlette.testclient import TestClient

    client = TestClient(case.operation.schema.app)  # no lifespan here: the app's state is already up
    r = client.request(case.method, case.path, content=json.dumps(case.body), headers={"content-type":
                                                                                      "application/json"})
    STATUSES[case.path, r.status_code] += 1
    check_response(r.status_code, r.headers.get("content-type", ""), r.text)


def _call(case) -> None:
    try:
        response = case.call()
    except UnicodeEncodeError as e:
        if not _raised_in_schemathesis(e):
            raise AssertionError(f"{case.method} {case.path} raised {e}\nbody: {case.body!r}") from e
        return _call_raw(case)
    except Exception as e:  # raised out of the app: uvicorn would have answered 500
        raise AssertionError(f"{case.method} {case.path} raised {type(e).__name__}: {e}\nbody: {case.body!r}") from e
    STATUSES[case.path, response.status_code] += 1
    content_type = ",".join(response.headers.get("content-type", []))
    text = (response.content or b"").decode("utf-8", "replace")
    try:
        check_response(response.status_code, content_type, text, response.stream_cut_short)
    except AssertionError as e:
        raise AssertionError(f"{case.method} {case.path} body {case.body!r}\n{e}") from None


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
@pytest.mark.parametrize("method, path, examples", OPERATIONS, ids=[f"{m} {p}" for m, p, _ in OPERATIONS])
def test_fuzz_no_5xx_and_openai_errors(fuzz_schema, method, path, examples, mode):
    if method == "GET" and mode is GenerationMode.NEGATIVE:
        pytest.skip("a route without inputs has no negative cases")
    operation = fuzz_schema[path][method]

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              print_blob=True)
    @given(case=_cases(operation, mode))
    def run(case):
        CASES[method, path, str(mode)] += 1
        _call(case)

    run()
    assert CASES[method, path, str(mode)] >= (1 if method == "GET" else examples)


def test_fuzz_generated_enough_cases():
    """Runs after the fuzz tests above (file order): together they must have sent at least 1,000 cases."""
    planned = {(m, p, str(g)) for m, p, _ in OPERATIONS for g in GenerationMode} - {
        (m, p, str(GenerationMode.NEGATIVE)) for m, p, _ in OPERATIONS if m == "GET"}
    if set(CASES) != planned:
        pytest.skip("not every fuzz test above ran in this session")
    total = sum(CASES.values())
    print(f"\nfuzz cases: {total} ({', '.join(f'{m} {p} {g}: {n}' for (m, p, g), n in sorted(CASES.items()))})")
    print(f"answers: {', '.join(f'{p} {code}: {n}' for (p, code), n in sorted(STATUSES.items()))}")
    assert total >= MIN_TOTAL_CASES, dict(CASES)


# -- the regression half ---------------------------------------------------------------------------------------
MAX_WAITING = 4  # the regression server's queue: n x prompts over it can never be served


def _chat(content: str) -> str:
    """A chat body whose one message's content is the raw JSON text `content`."""
    return '{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": ' + content + "}]}"


def _part(text: str) -> str:
    """A content-part list whose one text part's `text` is the raw JSON text `text`."""
    return '[{"type": "text", "text": ' + text + "}]"


# (id, path, raw JSON text): written as a client would send it (`\ud800` escapes, `NaN`, 2**63 spelled out).
REGRESSIONS = [
    ("surrogate-prompt", "/v1/completions", r'{"model": "tiny", "prompt": "a\ud800", "max_tokens": 2}'),
    ("surrogate-chat-content", "/v1/chat/completions", _chat(r'"a\ud800"')),
    ("surrogate-chat-part", "/v1/chat/completions", _chat(_part(r'"a\udfff"'))),
    ("surrogate-model", "/v1/completions", r'{"model": "tiny\ud800", "prompt": "a", "max_tokens": 2}'),
    ("surrogate-model-chat", "/v1/chat/completions",
     r'{"model": "\udc00", "messages": [{"role": "user", "content": "a"}]}'),
    ("surrogate-tokenize", "/tokenize", r'{"prompt": "a\ud800"}'),
    ("part-text-number", "/v1/chat/completions", _chat(_part("5"))),
    ("part-text-null", "/v1/chat/completions", _chat(_part("null"))),
    ("part-text-list", "/v1/chat/completions", _chat(_part('["a"]'))),
    ("part-text-number-tokenize", "/tokenize", '{"messages": [{"role": "user", "content": ' + _part("5") + "}]}"),
    ("token-ids-true", "/v1/completions", '{"model": "tiny", "prompt": [true], "max_tokens": 2}'),
    ("token-ids-nested-true", "/v1/completions", '{"model": "tiny", "prompt": [[1, true]], "max_tokens": 2}'),
    ("token-ids-negative", "/v1/completions", '{"model": "tiny", "prompt": [-1], "max_tokens": 2}'),
    ("token-ids-1e9", "/v1/completions", '{"model": "tiny", "prompt": [1000000000], "max_tokens": 2}'),
    ("detokenize-true", "/detokenize", '{"tokens": [true]}'),
    ("detokenize-negative", "/detokenize", '{"tokens": [-1]}'),
    ("detokenize-1e9", "/detokenize", '{"tokens": [1000000000]}'),
    ("steering-top-k-2**63", "/v1/completions",
     '{"model": "tiny-head", "prompt": "a", "max_tokens": 2, "steering": {"top_k": 9223372036854775808}}'),
    ("temperature-NaN", "/v1/completions", '{"model": "tiny", "prompt": "a", "max_tokens": 2, "temperature": NaN}'),
    ("temperature-NaN-chat", "/v1/chat/completions",
     '{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}'),
    ("n-x-prompts-over-queue", "/v1/completions", '{"model": "tiny", "prompt": ["a", "b"], "n": 3, "max_tokens": 2}'),
    ("n-x-prompts-over-queue-stream", "/v1/completions",
     '{"model": "tiny", "prompt": ["a", "b"], "n": 3, "max_tokens": 2, "stream": true}'),
]


@pytest.fixture(scope="module")
def regression_url(tiny_model, tokenizer):
    state, s = _state(tiny_model, tokenizer, max_waiting=MAX_WAITING)
    server, thread, url = _serve(create_app(s, state))
    yield url
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("path, raw", [r[1:] for r in REGRESSIONS], ids=[r[0] for r in REGRESSIONS])
def test_regression_gets_a_4xx_in_openai_shape_and_the_server_keeps_serving(regression_url, path, raw):
    r = httpx.post(regression_url + path, content=raw.encode(), headers={"content-type": "application/json"},
                   timeout=30)
    # The valid request goes before any assert: a server that failed logs its traceback from its own thread,
    # and on Python 3.11 that races pytest's own source parsing (a SystemError out of `ast`), so wait for it.
    ok = httpx.post(f"{regression_url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                    timeout=30)
    assert 400 <= r.status_code < 500, f"HTTP {r.status_code}: {r.text[:500]}"
    assert_openai_error(r.status_code, r.text)
    assert ok.status_code == 200, ok.text


def test_a_top_k_past_the_vocabulary_is_no_filter_not_an_engine_failure(regression_url):
    """top_k >= the vocabulary keeps every token (as vLLM clamps it): served, never the engine's overflow."""
    raw = '{"model": "tiny", "prompt": "a", "max_tokens": 2, "top_k": 9223372036854775808, "seed": 1}'
    r = httpx.post(regression_url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    plain = httpx.post(regression_url + "/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 2,
                                                                 "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_the_schema_is_no_looser_than_the_server(fuzz_schema, path):
    """Bodies that fit /openapi.json (schemathesis's positive mode, unshaped) are never refused as invalid: every
    bound a validator enforces (unsupported fields at their neutral value, non-empty prompts and messages, token
    ids in the vocabulary, the cross-field rules) is in the schema too. Other answers (404 for a model it does
    not serve, 503) are not about the schema and are allowed."""
    operation = fuzz_schema[path]["POST"]
    refused = []

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def run(case):
        try:
            response = case.call()
        except UnicodeEncodeError:
            return  # schemathesis cannot encode a lone surrogate it generated: nothing was sent
        if response.status_code == 400:
            refused.append((case.body, response.json()["error"]["message"]))

    run()
    assert not refused, refused[:3]
