"""The fused decode step (fused.py) against transformers' own forward, and the linears it runs (packed.Linear)."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from reasonmaxxer.steering.adapters import load_adapter
from reasonmaxxer.steering.attention import use_decode_attention
from reasonmaxxer.steering.batch import Batch
from reasonmaxxer.steering.compiled import CompiledDecoder
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.fused import FusedDecoder
from reasonmaxxer.steering.lora import LoraRouter
from reasonmaxxer.steering.packed import Linear, available, pack_linears, packed_count, unpack_linears
from reasonmaxxer.steering.request import Request
from reasonmaxxer.steering.sampling import SamplingParams

from conftest import make_lora, make_model

BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not available(torch.bfloat16), reason="oneDNN cannot pack bf16 on this CPU"))


def tiny_qwen2(tokenizer, cls=Qwen2ForCausalLM, config=Qwen2Config, **extra):
    """A tiny random Qwen2 (q/k/v with biases, GQA 4:2), or with `cls`/`config` another Llama-like family."""
    torch.manual_seed(3)
    cfg = config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
                 initializer_range=0.3, pad_token_id=tokenizer.pad_token_id, **extra)
    model = cls(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)  # biases that matter (transformers initialises them to 0)
    return model


def decode_both(model, prompts, steps: int, fused: FusedDecoder):
    """Prefill `prompts` once, then decode `steps` tokens on two copies of the batch: transformers' forward and
    the fused step, feeding both the same tokens. -> per step (reference hidden, fused hidden), and both batches."""
    with torch.inference_mode():
        ref, _ = Batch.prefill(model, prompts, 0)
        out = copy.deepcopy(ref)
        pairs = []
        for t in range(steps):
            ref.tokens = out.tokens = torch.arange(len(prompts)) * 7 + 3 * t + 5
            pairs.append((ref.decode(model), out.decode(model, fused)))
    return pairs, ref, out


def close(a, b, dtype):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.1)
    return torch.allclose(a.float(), b.float(), **tol)


def close_in_norm(a, b, dtype):
    """a and b equal to rounding as wholes: float32 element by element (`close`), bf16 within 2% relative error
    in norm. Where a compiled graph rounds once and the eager step after each op, a bf16 key or value a layer deep
    can part by a few ulps in single elements (on an AMD EPYC with AVX-512 BF16: 0.125 in one of 2,176 values, with
    0.6% in norm); a wrong column, row or layer parts by O(1) (keys shifted by one column: 130% in norm)."""
    if dtype == torch.float32:
        return close(a, b, dtype)
    a, b = a.float(), b.float()
    return bool((a - b).norm() <= 0.02 * a.norm())


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("packed", [True, False])
def test_fused_step_equals_transformers_forward(tokenizer, prompts, family, dtype, packed):
    model = (make_model(tokenizer) if family == "llama" else tiny_qwen2(tokenizer)).to(dtype)
    if packed:
        pack_linears(model)
    use_decode_attention(model)
    pairs, ref, out = decode_both(model, prompts, 4, FusedDecoder(model))
    for h_ref, h_fused in pairs:  # (B, d): every row, every step
        assert h_fused.shape == h_ref.shape and h_fused.dtype == h_ref.dtype
        assert close(h_ref, h_fused, dtype)
    for a, b in zip(ref.cache.layers, out.cache.layers, strict=True):  # the keys/values it wrote are the model's
        assert a.keys.shape == b.keys.shape and close(a.keys, b.keys, dtype) and close(a.values, b.values, dtype)
    unpack_linears(model)


def test_lora_routed_rows_get_their_adapters_and_the_others_the_base(tiny_model, tokenizer, prompts, tmp_path):
    make_lora(tiny_model, tokenizer, tmp_path / "a", name="a", seed=1)
    make_lora(tiny_model, tokenizer, tmp_path / "b", name="b", seed=2)
    router = LoraRouter(tiny_model)
    for name in "ab":
        router.add(load_adapter(tmp_path / name))
    routes = {"a": torch.tensor([0, 2]), "b": torch.tensor([3])}  # row 1: no adapter
    fused = FusedDecoder(tiny_model, router)
    with router.route(routes):  # the reference: transformers' forward with the router's hooks
        pairs, _, _ = decode_both(tiny_model, prompts, 3, fused)
    for h_ref, h_fused in pairs:
        assert torch.allclose(h_ref, h_fused, rtol=1e-4, atol=1e-4)
    _, _, plain = decode_both(tiny_model, prompts, 3, FusedDecoder(tiny_model, router))  # no route: the base
    with router.route(routes):
        _, _, routed = decode_both(tiny_model, prompts, 3, fused)
    k_plain, k_routed = plain.cache.layers[0].keys, routed.cache.layers[0].keys
    assert torch.equal(k_plain[1], k_routed[1])  # the row with no adapter is the base exactly
    assert not torch.allclose(k_plain[0], k_routed[0]) and not torch.allclose(k_plain[3], k_routed[3])


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_a_group_of_linears_gives_each_layers_own_output(dtype):
    torch.manual_seed(0)
    layers = [nn.Linear(32, n, bias=True).to(dtype) for n in (16, 8, 8)]
    x = torch.randn(5, 32, dtype=dtype)
    with torch.inference_mode():
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in layers], -1)
        assert torch.equal(Linear(*layers)(x), want)  # not packed: F.linear per layer
        for m in layers:
            pack_linears(m)
        alone = torch.cat([m(x) for m in layers], -1)  # each on its own packed copy
        group = Linear(*layers)  # one matmul on a packed copy of the concatenation, which replaces theirs
        assert group.weight() is not None and packed_count(nn.ModuleList(layers)) == 0
        assert torch.equal(group(x), alone)  # column for column what each layer computes alone
        with torch.no_grad():
            layers[1].weight.mul_(2.0)  # changed in place: repacked at the next call
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        want = torch.cat([F.linear(x, m.weight, m.bias) for m in layers], -1)
        assert torch.allclose(group(x).float(), want.float(), rtol=tol, atol=tol)


def test_models_that_are_not_llamas_run_transformers_forward(tokenizer):
    llama = make_model(tokenizer)
    assert FusedDecoder.unsupported(llama) is None
    qwen3 = tiny_qwen2(tokenizer, Qwen3ForCausalLM, Qwen3Config, head_dim=16)  # q/k norms: not fused
    assert "qwen3" in FusedDecoder.unsupported(qwen3) and FusedDecoder.of(qwen3) is None
    qwen3.config.model_type = "llama"  # a known name does not pass a layer that is not Llama's
    assert "q/k norms" in FusedDecoder.unsupported(qwen3)
    qwen3.config.model_type = "qwen3"
    gelu = make_model(tokenizer)
    gelu.config.hidden_act = "gelu"
    assert "silu" in FusedDecoder.unsupported(gelu)
    window = tiny_qwen2(tokenizer, use_sliding_window=True, sliding_window=8)
    assert "sliding" in FusedDecoder.unsupported(window)
    assert Engine(llama, tokenizer).fused is not None
    assert Engine(qwen3, tokenizer).fused is None and Engine(llama, tokenizer, step="reference").fused is None
    compiled = Engine(llama, tokenizer, step="compiled")  # the fused prefill, and its decode step compiled
    assert compiled.fused is not None and compiled.compiled.fused is compiled.fused
    assert Engine(qwen3, tokenizer, step="compiled").compiled.fused is None  # transformers' decoder compiled
    assert Engine(llama, tokenizer, step="module").fused is None  # the A/B switch: transformers' forward
    unpack_linears(llama)


def test_fused_engine_decodes_qwen2_as_transformers_does(tokenizer, prompts):
    model = tiny_qwen2(tokenizer)
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = Engine(model, tokenizer)
    assert engine.fused is not None
    got = [c.token_ids for c in engine.generate([Request(p, sp) for p in prompts])]
    with torch.no_grad():
        for prompt, tokens in zip(prompts, got, strict=True):
            ids = list(prompt)
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            assert tokens == ids[len(prompt):]
    unpack_linears(model)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_packed_prefill_equals_the_left_padded_forward(tokenizer, prompts, family, dtype):
    model = (make_model(tokenizer) if family == "llama" else tiny_qwen2(tokenizer)).to(dtype)
    pack_linears(model)
    use_decode_attention(model)
    fused = FusedDecoder(model)
    with torch.inference_mode():
        ref, h_ref = Batch.prefill(model, prompts, 0)  # transformers' forward, left-padded, masked
        out, h_out = Batch.prefill(model, prompts, 0, fused=fused)
        assert close(h_ref, h_out, dtype)  # (B, d) at each prompt's last token
        assert torch.equal(ref.mask, out.mask) and torch.equal(ref.positions, out.positions)
        real = ref.mask == 1  # (B, S); transformers' forward runs the pad tokens too (with biases, k = b there)
        for a, b in zip(ref.cache.layers, out.cache.layers, strict=True):
            assert a.keys.shape == b.keys.shape
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                x, y = x.transpose(1, 2), y.transpose(1, 2)  # (B, S, Hkv, D)
                assert close(x[real], y[real], dtype) and not y[~real].any()  # the fused padding: zeros
        ref.tokens = out.tokens = torch.tensor([5, 6, 7, 8])
        assert close(ref.decode(model), out.decode(model, fused), dtype)  # decoding on from either is the same
    unpack_linears(model)


def test_the_fused_prefill_refuses_lora_routes(tiny_model, tokenizer, prompts, tmp_path):
    make_lora(tiny_model, tokenizer, tmp_path / "a", name="a")
    router = LoraRouter(tiny_model)
    router.add(load_adapter(tmp_path / "a"))
    with router.route({"a": torch.tensor([0])}), pytest.raises(ValueError, match="LoRA routes"):
        FusedDecoder(tiny_model, router).prefill(prompts)


def test_spare_cache_columns_never_reach_the_output(tiny_model, tokenizer, prompts):
    """The decode attention runs on the whole buffers (the filled part is a view torch would copy); whatever
    finite values the spare columns hold, the step's hidden states are the same."""
    fused = FusedDecoder(tiny_model)
    with torch.inference_mode():
        batch, _ = Batch.prefill(tiny_model, prompts, 0, fused=fused)
        batch.tokens = torch.tensor([5, 6, 7, 8])
        noisy = copy.deepcopy(batch)
        for layer in noisy.cache.layers:
            k, v = layer.buffers()
            assert k.is_contiguous() and k.shape[2] > layer._n  # spare room, read by the step
            k[:, :, layer._n:] = 1e4
            v[:, :, layer._n:] = -1e4
        assert torch.equal(batch.decode(tiny_model, fused), noisy.decode(tiny_model, fused))


def test_grouped_projections_take_over_their_layers_packed_copies(tokenizer, prompts):
    """q/k/v and gate/up run on one packed copy per group, which replaces the layers' own (no memory added);
    transformers' forward then runs those layers on F.linear, with the same values."""
    model = make_model(tokenizer)
    n = pack_linears(model)
    with torch.inference_mode():
        want = model(torch.tensor([prompts[1]])).logits
    FusedDecoder(model)
    assert packed_count(model) == n - 5 * len(model.get_decoder().layers)  # o_proj, down_proj, lm_head stay
    with torch.inference_mode():
        assert torch.allclose(model(torch.tensor([prompts[1]])).logits, want, rtol=1e-4, atol=1e-4)
    unpack_linears(model)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_compiled_fused_step_equals_the_eager_one(tokenizer, prompts, family, dtype):
    """The fused step's arithmetic under torch.compile with frozen weights (compiled.py): the same hidden states
    and the same keys/values written, to rounding, step after step, on the fused prefill's buffers."""
    model = (make_model(tokenizer) if family == "llama" else tiny_qwen2(tokenizer)).to(dtype)
    pack_linears(model)
    use_decode_attention(model)
    fused = FusedDecoder(model)
    compiled = CompiledDecoder(model, fused)
    with torch.inference_mode():
        eager, _ = Batch.prefill(model, prompts, 0, fused=fused)
        graph = copy.deepcopy(eager)
        for t in range(4):
            eager.tokens = graph.tokens = torch.arange(len(prompts)) * 7 + 3 * t + 5
            a, b = eager.decode(model, fused), graph.decode(model, compiled)
            assert compiled.failed is None and b.shape == a.shape and b.dtype == a.dtype and close(a, b, dtype)
    for x, y in zip(eager.cache.layers, graph.cache.layers, strict=True):
        assert x._n == y._n and close_in_norm(x.keys, y.keys, dtype) and close_in_norm(x.values, y.values, dtype)
    unpack_linears(model)


def test_lora_routed_steps_take_the_eager_fused_step(tiny_model, tokenizer, prompts, tmp_path):
    """Rows routed to a LoRA get their deltas: the compiled step hands such a step to the eager fused one."""
    make_lora(tiny_model, tokenizer, tmp_path / "a", name="a", seed=1)
    router = LoraRouter(tiny_model)
    router.add(load_adapter(tmp_path / "a"))
    fused = FusedDecoder(tiny_model, router)
    compiled = CompiledDecoder(tiny_model, fused)
    calls = []
    compiled.compiled = lambda *args: calls.append(1)  # the graph must not be asked for a routed step
    with router.route({"a": torch.tensor([0, 2])}):
        (pairs, _, _), (want, _, _) = decode_both(tiny_model, prompts, 3, compiled), \
            decode_both(tiny_model, prompts, 3, fused)
    assert not calls and compiled.failed is None
    for (_, got), (_, ref) in zip(pairs, want, strict=True):
        assert torch.equal(got, ref)
