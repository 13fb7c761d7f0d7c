"""The transformers engine and the fitting code on the model's device (cpu here, cuda where there is one).

Each test runs once per available device, so on a CPU-only machine it checks the test itself, and on a
GPU machine it catches tensors made on the CPU and combined with the model's (adapter weights, index
tensors, masks, generators, fresh training parameters). Assertions are device-independent: every mode
runs, same seed gives the same tokens, adapters come back on the CPU, the fits take finite steps.
"""

from __future__ import annotations

import copy

import pytest
import torch

from reasonmaxxer.steering.adapters import HeadAdapter, LoraAdapter
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams
from reasonmaxxer.training.fit import FitArgs, fit
from reasonmaxxer.training.scoring import score_sequence

from conftest import sampled_records

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _model(tiny_model, device: str):
    return copy.deepcopy(tiny_model).to(device)


def _requests(prompts) -> list[Request]:
    """Every steering mode and sampling path, on prompts of different lengths (left padding)."""
    sp = lambda seed, **kw: SamplingParams(max_tokens=6, temperature=1.0, seed=seed, **kw)  # noqa: E731
    return [
        Request(prompts[0], sp(1, top_k=20, top_p=0.9, min_p=0.01, logprobs=3)),
        Request(prompts[1], SamplingParams(max_tokens=6, temperature=0.0, logprobs=2), SteeringParams(logprobs="base")),
        Request(prompts[2], sp(2), SteeringParams("head", "gated", threshold=0.0, trace=True)),
        Request(prompts[3], sp(3, logprobs=1), SteeringParams("head", "always")),
        Request(prompts[0], sp(4), SteeringParams("lora", "gated", threshold=0.0, trace=True)),
        Request(prompts[1], sp(5, top_p=0.8), SteeringParams("lora", "always")),
        Request(prompts[2], sp(6), SteeringParams("head", "random", rate=0.5)),
    ]


def _engine(model, tokenizer, lora_dir) -> Engine:
    engine = Engine(model, tokenizer, max_batch_size=4)  # fewer rows than requests: rows join and leave
    engine.add_adapter(HeadAdapter.create(model, tokenizer, "head", rank=4, b_std=0.5, seed=3))
    lora = LoraAdapter.load(lora_dir)
    lora.manifest.name = "lora"
    engine.add_adapter(lora)
    return engine


@pytest.mark.parametrize("device", DEVICES)
def test_every_mode_decodes_on_the_model_device_and_seeds_reproduce(device, tiny_model, tokenizer, prompts,
                                                                     lora_setup):
    model = _model(tiny_model, device)
    runs = []
    for _ in range(2):
        engine = _engine(model, tokenizer, lora_setup[0])
        first = engine.generate(_requests(prompts)[:3])  # a batch running ...
        for r in _requests(prompts)[3:]:  # ... then more requests merged into it mid-decode
            engine.submit(r)
        rest = [engine.step() for _ in range(2)]
        assert any(rest)
        while engine.has_work:
            engine.step()
        runs.append([c.token_ids for c in first])
        outs = engine.generate(_requests(prompts))
        assert all(c.finish_reason in ("stop", "length") and c.token_ids for c in outs)
        assert len(outs[0].logprobs) == len(outs[0].token_ids)
        assert outs[2].report.gate_fired > 0 and outs[4].report.gate_fired > 0  # threshold 0: fires
        runs.append([c.token_ids for c in outs])
    assert runs[0] == runs[2] and runs[1] == runs[3]


@pytest.mark.parametrize("device", DEVICES)
def test_cancel_and_eviction_on_the_model_device(device, tiny_model, tokenizer, prompts):
    engine = Engine(_model(tiny_model, device), tokenizer)
    reqs = [Request(p, SamplingParams(max_tokens=4 + i, temperature=0.7, seed=i)) for i, p in enumerate(prompts)]
    for r in reqs:
        engine.submit(r)
    engine.step()
    engine.cancel(reqs[1].request_id)
    events = []
    while engine.has_work:
        events += engine.step()
    finished = {e.request_id: e.finish_reason for e in events if e.finished}
    assert finished[reqs[1].request_id] == "cancelled" and len(finished) == len(reqs)


@pytest.fixture(scope="module")
def records(tiny_model, tokenizer, prompts):
    return sampled_records(tiny_model, tokenizer, prompts, max_tokens=10, seed_base=10)


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_and_fits_run_on_the_model_device(device, tiny_model, tokenizer, records, prompts):
    model = _model(tiny_model, device)
    s = score_sequence(model, records[0]["prompt_ids"], records[0]["completion_ids"])
    assert s.entropy.device.type == device and torch.isfinite(s.entropy).all()
    for kind in ("head", "lora"):
        args = FitArgs(kind=kind, name=f"d-{kind}", target_fire_rate=0.2, rank=4, lora_alpha=8, lr=1e-3,
                       accumulation=4, warmup=1, keep_problems=10)
        adapter, report = fit(model, tokenizer, records, args, progress=False)
        assert report["steps"] >= 1 and all(torch.isfinite(torch.tensor(h["loss"])) for h in
                                            adapter.manifest.provenance["losses"])
        tensors = [adapter.A, adapter.B] if kind == "head" else [t for ab in adapter.weights.values() for t in ab]
        assert all(t.device.type == "cpu" for t in tensors)  # saved and served from the CPU, like a loaded one
        engine = Engine(model, tokenizer)
        engine.add_adapter(adapter)
        mode = "always" if kind == "lora" else "gated"
        out = engine.generate([Request(prompts[0], SamplingParams(max_tokens=4, temperature=0.5, seed=1),
                                       SteeringParams(adapter.name, mode, threshold=0.0 if mode == "gated" else None))])
        assert len(out[0].token_ids) == 4 or out[0].finish_reason == "stop"
