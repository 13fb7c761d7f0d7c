"""Prompt scoring (`echo` with `logprobs`, what lm-eval sends) is admitted like generation and never stalls a
running stream: with `--max-waiting 4`, eight concurrent scoring requests get 4 places and 4 answers of 503
before any scoring; the engine thread runs at most one piece of scoring (CHUNK prompt positions) between two
decode steps, so a stream's gap between tokens is at most one step plus one piece; during a drain a scoring
request gets its 503 before any engine work."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from test_server import _serve, _state

from reasonmaxxer.server.app import create_app
from reasonmaxxer.steering import prompt_logprobs

PROMPT = list(range(10, 50))  # 40 token ids: 10 pieces of 4 positions


@pytest.fixture
def held(tiny_model, tokenizer, monkeypatch):
    """A live server (max_waiting 4) whose engine thread records what it runs ("S" a step, "P" a scoring piece,
    with the stream's token count at each step) and can be held inside a step."""
    monkeypatch.setattr(prompt_logprobs, "CHUNK", 4)
    state, settings = _state(tiny_model, tokenizer, step_delay=0.005, max_waiting=4)
    engine = state.engine.engine
    timeline: list[str] = []
    hold, release = threading.Event(), threading.Event()
    step, pieces = engine.step, engine.prompt_logprobs_pieces

    def recorded_step():
        if hold.is_set():
            release.wait(30)
        events = step()
        timeline.append("S")
        return events

    def recorded_pieces(*args):
        gen = pieces(*args)

        def run():
            try:
                while True:
                    next(gen)
                    timeline.append("P")
                    yield
            except StopIteration as done:
                timeline.append("P")
                return done.value

        return run()

    engine.step, engine.prompt_logprobs_pieces = recorded_step, recorded_pieces
    server, thread, url = _serve(create_app(settings, state))
    yield url, state, timeline, hold, release
    release.set()
    server.should_exit = True
    thread.join(10)


def _score(url: str, out: list) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "echo": True, "logprobs": 1,
                                                  "max_tokens": 0}, timeout=60)
    out.append(r)


def _stream(url: str, lines: list) -> None:
    body = {"model": "tiny", "prompt": "Count:", "max_tokens": 64, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines.extend(line for line in r.iter_lines() if line)


def test_eight_scoring_requests_get_four_places_and_the_stream_waits_one_piece_at_most(held):
    url, state, timeline, hold, release = held
    lines: list = []
    streamer = threading.Thread(target=_stream, args=(url, lines))
    streamer.start()
    while state.engine.num_running < 1:
        time.sleep(0.005)
    hold.set()  # the engine thread stops inside its next step: nothing scores while the requests arrive
    answers: list = []
    clients = [threading.Thread(target=_score, args=(url, answers)) for _ in range(8)]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 30
    while len(answers) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(answers) == 4 and all(r.status_code == 503 for r in answers), [r.text for r in answers]
    assert {r.json()["error"]["code"] for r in answers} == {"overloaded"}
    assert state.engine.num_waiting == 4  # the four admitted hold their places while they wait
    assert "P" not in timeline  # refused before any scoring
    hold.clear()
    release.set()
    for t in [*clients, streamer]:
        t.join(60)
    scored = [r for r in answers if r.status_code == 200]
    assert len(scored) == 4
    assert all(len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == len(PROMPT) for r in scored)
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    # The bound, in steps: while the stream ran, never two scoring pieces without a decode step between them.
    assert timeline.count("P") == 4 * 10
    last_step = len(timeline) - 1 - timeline[::-1].index("S")
    assert "PP" not in "".join(timeline[:last_step]), "".join(timeline)
    assert state.engine.num_waiting == 0


def test_a_scoring_request_during_the_drain_is_refused_before_any_engine_work(held):
    url, state, timeline, _, _ = held
    state.draining = True
    try:
        out: list = []
        _score(url, out)
    finally:
        state.draining = False
    assert out[0].status_code == 503 and out[0].json()["error"]["code"] == "shutting_down"
    assert "P" not in timeline
