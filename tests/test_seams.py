"""The seams between the packages, each named once: the engine interfaces, the steering value, the import graph.

- every engine satisfies its Protocol (steering/interfaces.py): real engines where they build here, the vLLM ones
  by their class's members and signatures (vLLM need not be installed);
- the steering value refuses each invalid field with the same message at every entry point: the Python API
  (`SteeringParams`), HTTP (the `steering` object, over a real server), vLLM's `extra_args` (`parse_xargs`),
  and the CLI (`reasonmaxxer generate --mode/--threshold`, before any model loads);
- the import graph of our modules, imports inside functions counted, has no cycle; server never imports
  training; steering imports neither server nor training;
- a correction source this project does not ship is one class pair and one `corrections.register` call.
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_server import serving_tiny

from reasonmaxxer.steering import corrections, interfaces
from reasonmaxxer.steering.adapters import load_adapter
from reasonmaxxer.steering.async_engine import AsyncEngine
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.manifest import GateSpec, Manifest, base_identity, check_identity
from reasonmaxxer.steering.request import Request, SteeringParams
from reasonmaxxer.steering.sampling import SamplingParams
from reasonmaxxer.steering.vllm import XARGS_KEY, parse_xargs

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"steering": "reasonmaxxer.steering", "server": "reasonmaxxer.server", "training": "reasonmaxxer.training",
            "clients": "reasonmaxxer.clients", "reasonmaxxer": "reasonmaxxer"}


# ---- engines and their Protocols ------------------------------------------------------------------------------
def _members(protocol) -> list[str]:
    """A Protocol's own members: its annotated data members, methods and properties."""
    names = set(inspect.get_annotations(protocol)) | {n for n, v in vars(protocol).items()
                                                      if callable(v) or isinstance(v, property)}
    return sorted(n for n in names if not n.startswith("_"))


def test_the_embedded_engines_satisfy_their_protocols(tiny_model, tokenizer):
    engine = Engine(tiny_model, tokenizer)
    assert isinstance(engine, interfaces.StepEngine)
    front = AsyncEngine(engine)
    try:
        assert isinstance(front, interfaces.ServingEngine)
        assert set(front.describe()) == {"device", "dtype", "kernels", "step"}
    finally:
        front.close(drain=False)
    assert not isinstance(engine, interfaces.ServingEngine)  # the Protocols say something: a bare engine is no server


@pytest.mark.parametrize("module, cls, protocol", [
    ("reasonmaxxer.steering.vllm.engine", "VllmEngine", interfaces.ServingEngine),
    ("reasonmaxxer.steering.vllm.offline", "VllmOfflineEngine", interfaces.StepEngine),
    ("reasonmaxxer.steering.async_engine", "AsyncEngine", interfaces.ServingEngine),
    ("reasonmaxxer.steering.engine", "Engine", interfaces.StepEngine),
])
def test_every_engine_class_has_its_protocols_members_with_their_parameters(module, cls, protocol):
    """By the class, so vLLM's engines are checked where vLLM is not installed: each method of the Protocol is
    there with the same parameters; each data member is set by __init__ or is a property."""
    import importlib

    klass = getattr(importlib.import_module(module), cls)
    init_source = "".join(inspect.getsource(k.__init__) for k in klass.__mro__[:-1] if "__init__" in vars(k))
    for name in _members(protocol):
        wanted = getattr(protocol, name, None)
        if callable(wanted) and not isinstance(wanted, property):
            have = getattr(klass, name, None)
            assert callable(have), f"{cls}.{name} is missing"
            want, got = inspect.signature(wanted).parameters, inspect.signature(have).parameters
            assert list(got)[: len(want)] == list(want), name  # the Protocol's parameters first, in its order
            assert all(p.default is not p.empty for p in list(got.values())[len(want):]), name  # extras optional
            assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(wanted), name
        else:
            assert isinstance(getattr(klass, name, None), property) or re.search(
                rf"self\.{name}\b[^=\n(]*=", init_source), f"{cls}.{name} is missing"


# ---- the steering value ----------------------------------------------------------------------------------------
BAD = [  # (field values, the message every entry point gives)
    ({"mode": "sometimes"}, "steering mode 'sometimes' is unknown: use one of off, gated, always, random"),
    ({"threshold": -1.0}, "steering threshold must be a number >= 0"),
    ({"top_k": 5000}, "steering top_k must be an integer from 1 to 1000"),
    ({"top_k": -1}, "steering top_k must be an integer from 1 to 1000"),
    ({"rate": 1.5}, "steering rate must be a probability in [0, 1]"),
    ({"logprobs": "raw"}, "steering logprobs must be 'steered' or 'base'"),
]


@pytest.fixture(scope="module")
def http(tiny_model, tokenizer):
    yield from serving_tiny(tiny_model, tokenizer)


@pytest.mark.parametrize("fields, message", BAD)
def test_an_invalid_steering_field_gets_one_message_at_every_entry_point(http, fields, message):
    with pytest.raises(ValueError) as python:
        SteeringParams(adapter="tiny-head", mode=fields.get("mode", "gated"),
                       **{k: v for k, v in fields.items() if k != "mode"})
    assert message in str(python.value)
    with pytest.raises(ValueError) as vllm:
        parse_xargs({XARGS_KEY: {"rid": "r", "adapter": "/a", "mode": "gated", "threshold": 1.0, "top_k": 5,
                                 **fields}})
    assert message in str(vllm.value)
    r = httpx.post(f"{http}/v1/completions", json={"model": "tiny-head", "prompt": "x", "max_tokens": 2,
                                                   "steering": fields}, timeout=30)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("flag, value, message", [(f, str(v), m) for fields, m in BAD for f, v in
                                                  [(f"--{k}", v) for k, v in fields.items()]
                                                  if f in ("--mode", "--threshold")])
def test_the_cli_refuses_a_steering_flag_with_the_same_message_before_any_model_loads(flag, value, message):
    run = subprocess.run([sys.executable, "-m", "reasonmaxxer.cli", "generate", "hi", flag, value],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_the_steering_value_is_frozen_and_its_json_form_round_trips():
    st = SteeringParams(adapter="a", mode="gated", threshold=math.inf, top_k=3, trace=True, logprobs="base")
    with pytest.raises(AttributeError):
        st.threshold = 1.0
    assert st.to_json()["threshold"] == "inf" and SteeringParams.from_json(st.to_json()) == st
    with pytest.raises(ValueError, match=r"unknown field.*treshold"):
        SteeringParams.from_json({"treshold": 1})


def test_resolution_fills_what_the_request_left_to_its_adapter(tiny_model, tokenizer):
    from reasonmaxxer.steering.adapters import HeadAdapter

    head = HeadAdapter.create(tiny_model, tokenizer, "h", rank=2, tau=2.5, top_k=4, seed=0)
    st = SteeringParams(adapter="h", mode="gated").resolved(head.manifest)
    assert (st.threshold, st.top_k, st.gate_tau, st.random_rate) == (2.5, 4, 2.5, None)
    assert SteeringParams(adapter="h", mode="always").resolved(head.manifest).gate_tau == -math.inf
    assert SteeringParams().resolved(None).gate_tau == math.inf
    with pytest.raises(ValueError, match="mode random needs a fire rate"):
        SteeringParams(adapter="h", mode="random").resolved(head.manifest)
    with pytest.raises(ValueError, match="for teachers only"):
        SteeringParams(adapter="h", mode="gated", top_k=0).resolved(head.manifest)


# ---- the import graph -------------------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Module -> our modules it imports, at module level or inside functions (`from . import x` counts x)."""
    files = {_module_name(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "reasonmaxxer":
                    edges.add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle_and_keeps_the_package_rules():
    graph = _graph()
    assert len(graph) > 50  # the walk found the packages
    assert _cycles(graph) == []
    server, steering, training = "reasonmaxxer.server", "reasonmaxxer.steering", "reasonmaxxer.training"
    broken = [(a, b) for a, targets in graph.items() for b in targets
              if (a.startswith(server) and b.startswith(training))
              or (a.startswith(steering) and b.startswith((server, training)))]
    assert broken == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# ---- a new correction source: one module, one registration ------------------------------------------------------
class BiasAdapter:
    """A correction source this project does not ship: a fixed logit bias where the gate fires."""

    def __init__(self, manifest, bias: torch.Tensor):
        self.manifest, self.bias = manifest, bias

    @property
    def name(self) -> str:
        return self.manifest.name

    def validate(self, model, tokenizer) -> None:
        check_identity(self.name, self.manifest.base_model, base_identity(model, tokenizer))

    def save(self, directory: Path) -> Path:
        save_file({"bias": self.bias}, str(directory / "bias.safetensors"))
        self.manifest.save(directory)
        return directory

    @classmethod
    def load(cls, directory) -> BiasAdapter:
        return cls(Manifest.load(directory), load_file(str(Path(directory) / "bias.safetensors"))["bias"])


class BiasCorrection(corrections.CorrectionBase):
    kind, vllm = "test-bias", None

    def steer(self, engine, rows, idx, batch, hidden, logits, fired, out):
        out = logits.clone() if out is logits else out
        for i in idx:
            out[i] = logits[i] + rows[i].adapter.bias * fired[i]
        return out

    def score(self, engine, adapter, prompt, sel, hidden, logits, gate):
        return logits[sel] + adapter.bias


def test_a_new_correction_source_is_one_module_and_one_registration(tiny_model, tokenizer, tmp_path):
    corrections.register(BiasCorrection(), artifact=BiasAdapter)
    favourite = 7
    bias = torch.zeros(tiny_model.config.vocab_size)
    bias[favourite] = 1e4
    manifest = Manifest(kind="test-bias", name="bias", base_model=base_identity(tiny_model, tokenizer),
                        gate=GateSpec(tau=0.0))
    loaded = load_adapter(BiasAdapter(manifest, bias).save(tmp_path))  # adapter.json's kind picks the class
    assert isinstance(loaded, BiasAdapter)
    engine = Engine(tiny_model, tokenizer)
    engine.add_adapter(loaded)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    base = engine.generate([Request([1, 2, 3], sp)])[0]
    always = engine.generate([Request([1, 2, 3], sp, SteeringParams("bias", "always"))])[0]
    never = engine.generate([Request([1, 2, 3], sp, SteeringParams("bias", "gated", math.inf))])[0]
    assert always.token_ids == [favourite] * 6 and always.report.gate_fired == 6
    assert never.token_ids == base.token_ids and never.report.gate_fired == 0
    scores = engine.prompt_logprobs([[1, 2, favourite]], SteeringParams("bias", "always"), 0)[0]
    assert scores.fired == 2 and scores.logprobs[2] > -1e-3  # the bias makes the favourite certain
