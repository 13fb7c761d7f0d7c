"""The soak bench (bench/soak.py), short, against the tiny-model server, so that CI runs it.

Contract: 8 concurrent streaming clients for 15 s, a tenth of their requests bad, against a real uvicorn
server whose decode steps take 5 ms: no 5xx, no transport error, every good stream ends with `data: [DONE]`
and a usage chunk, every bad request is refused, and the server's /metrics deltas (generated and gate-fired
tokens, responses by status) equal the clients' sums. The full figure (32 streams, 2 minutes) is run by hand:
`python bench/soak.py --url http://127.0.0.1:8000 --streams 32 --duration 120` against `reasonmaxxer serve`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest
from test_server import _serve, _state

from reasonmaxxer.server.app import create_app

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_short(tiny_model, tokenizer):
    soak = _load_soak()
    state, settings = _state(tiny_model, tokenizer, step_delay=0.005)
    server, thread, url = _serve(create_app(settings, state))
    try:
        figures = asyncio.run(soak.soak(url, streams=8, duration=15, bad_fraction=0.1, max_tokens=16, seed=1,
                                        progress_every=5))
    finally:
        server.should_exit = True
        thread.join(10)
    soak.print_summary(figures)
    assert figures["fivexx"] == 0 and figures["transport_errors"] == 0, figures["statuses"]
    assert figures["good"] > 0 and figures["good_without_done"] == 0 and figures["good_without_usage"] == 0
    assert figures["bad"] > 0 and figures["bad_accepted"] == 0, figures["statuses"]
    assert figures["metrics"]["agree"], figures["metrics"]
    assert figures["metrics"]["client_gate_fired"] > 0  # the adapter's gate fired somewhere: the sum is tested
    assert figures["failures"] == []
