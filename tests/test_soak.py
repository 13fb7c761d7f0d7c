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
import os
import sys
from pathlib import Path

import pytest
from test_server import _serve, _state

from reasonmaxxer.server.app import create_app

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def _load_soak():
    if str(SOAK.parent) not in sys.path:  # the bench scripts import their neighbours (machine.py)
        sys.path.insert(0, str(SOAK.parent))
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_soak_short(tiny_model, tokenizer, tmp_path):
    soak = _load_soak()
    state, settings = _state(tiny_model, tokenizer, step_delay=0.005)
    server, thread, url = _serve(create_app(settings, state))
    try:
        figures = asyncio.run(soak.soak(url, streams=8, duration=15, bad_fraction=0.1, max_tokens=16, seed=1,
                                        progress_every=5, pid=os.getpid(), rss_every=4))
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
    # this process serves, so its RSS is the server's: sampled at the start, every 4 s and at the end
    times = [t for t, _ in figures["rss_mb"]]
    assert len(times) >= 4 and times == sorted(times) and times[-1] == figures["wall_s"]
    assert 0 < figures["rss_start_mb"] <= figures["rss_peak_mb"] and figures["rss_second_half_mb_per_hour"] is not None
    plot = tmp_path / "rss.svg"
    soak.plot_rss([tuple(p) for p in figures["rss_mb"]], str(plot), "test")
    assert plot.read_text().startswith("<svg") and "<polyline" in plot.read_text()


def test_the_rss_summary_reads_a_plateau_as_flat_and_growth_as_growth():
    soak = _load_soak()
    flat = soak.rss_summary([(0, 900.0), (600, 1500.0), (1200, 1600.0), (1800, 1600.0), (2400, 1601.0),
                             (3000, 1600.0), (3600, 1600.0)])
    assert abs(flat["rss_second_half_mb_per_hour"]) < 5 and flat["rss_peak_mb"] == 1601.0
    growing = soak.rss_summary([(t * 60.0, 1000.0 + t) for t in range(61)])  # 1 MB a minute
    assert growing["rss_second_half_mb_per_hour"] == 60.0
