"""A fused decode step and prefill for Llama-family decoders: transformers' forward as a stack of small functions.

Contract: `FusedDecoder.of(model, router)` returns a decoder for a model whose layers are Llama's (model types
llama, qwen2 and mistral: RMSNorm, rotary q/k, grouped-query attention, a SiLU-gated MLP), else None (the
engine then runs transformers' forward). Called as `Batch.decode`'s step (input ids (B, 1), mask (B, S) with
the new column, positions (B, 1), the batch's cache of GrowingLayers), it writes each layer's new key and
value into the cache and returns the final hidden states (B, d); `prefill(prompts)` returns a left-padded
cache for the prompts and their last tokens' final hidden states (B, d). A decode step gives transformers'
forward on the same linears bit for bit here (Llama and Qwen2, float32 and bfloat16; tested to rounding,
other CPUs may block matmuls otherwise); the prefill equals it to rounding (other matmul shapes).

What it leaves out is everything but the arithmetic: module calls, hooks, keyword plumbing, the attention
mask rebuilt for every layer (here one additive mask per step) and, in the prefill, padding: the prompts are
packed end to end, so no matmul computes a pad token (only the attention pads, each prompt causally over
itself), and the last layer runs o_proj and the MLP for the last tokens only. Per layer:
- RMSNorm as transformers computes it (float32, cast back, times the weight);
- q, k and v from one matmul on their concatenated packed weights, and gate and up from another (packed.Linear:
  the concatenated copies replace the layers' own packed copies, so no memory is added);
- rotary embeddings on q and k together: x cos + rotate_half(x) sin, with the sign of rotate_half folded
  into sin (the same values); cos and sin from the model's own rotary module, once per forward;
- attention: attention.grouped_decode over the cache in a decode step (no row is fully masked: each sees its
  own new column); torch's causal sdpa in the prefill;
- SiLU(gate) * up and the residual adds as transformers computes them (oneDNN's post-ops would fuse them
  into the matmuls, but round once where transformers rounds twice: greedy bf16 text then parted from
  transformers' within 14 tokens on one of four SmolLM2 prompts; unfused, none in 48).
In a decode step, rows routed to a LoRA (lora.LoraRouter) get its delta on every projection it targets, as
the router's hooks add it (the output rounded, then the delta added in float32). The prefill refuses LoRA
routes (they name rows; its rows are tokens): the engine prefills rows whose LoRA runs on every forward with
transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DynamicCache

from .attention import grouped_decode
from .batch import HEADROOM, GrowingLayer, new_cache
from .packed import Linear

__all__ = ["FusedDecoder", "StepBias"]

MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class _Layer:
    norm1: nn.Module
    norm2: nn.Module
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    names: dict[str, str]  # projection -> module name (the LoRA router's key)
    scaling: float
    inner: int  # the MLP's width


@dataclass
class _Packing:
    """Where each token of prompts packed end to end goes: its row (N,), its column in the left-padded cache (N,)
    and its position in its prompt (N,); each prompt's last token (B,); the prompts' lengths; the longest."""

    rows: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    ends: torch.Tensor
    lengths: list[int]
    width: int

    @classmethod
    def of(cls, lengths: list[int], device) -> _Packing:
        width = max(lengths)
        n = torch.tensor(lengths)
        rows = torch.repeat_interleave(torch.arange(len(lengths)), n)  # (N,)
        starts = torch.cumsum(n, 0) - n  # (B,) first token of each prompt in the packing
        right = torch.arange(int(n.sum())) - starts[rows]  # (N,) position within its prompt
        left = right + (width - n)[rows]
        ends = starts + n - 1
        return cls(rows.to(device), left.to(device), right.to(device), ends.to(device), list(lengths), width)


class StepBias:
    """A decode step's additive attention mask (B, 1, 1, W) for buffers W columns wide: 0 where the batch mask
    (B, S) is 1, -inf where it is 0 and on the spare columns S..W-1 (made once per width, per step)."""

    def __init__(self, mask: torch.Tensor):
        self.mask, self._by_width = mask, {}

    def __call__(self, width: int) -> torch.Tensor:
        bias = self._by_width.get(width)
        if bias is None:
            b, s = self.mask.shape
            bias = torch.full((b, width), float("-inf"), device=self.mask.device)
            bias[:, :s].masked_fill_(self.mask != 0, 0.0)
            bias = self._by_width[width] = bias[:, None, None]
        return bias


def _decode_attention(kv, bias: StepBias, scaling: float, q, k, v) -> torch.Tensor:
    """A decode step's attention: write the new key/value (B, Hkv, D) into the cache layer kv, and attend with
    q (B, H, D) over its whole buffers, the spare columns masked: the buffers are contiguous, so the batched
    matmuls read them in place (on the filled part alone, a view, torch would copy both on every call). -> (B, H D)"""
    kv.update(k[:, :, None], v[:, :, None])
    keys, values = kv.buffers()  # (B, Hkv, W, D)
    return grouped_decode(q, keys, values, bias(keys.shape[2]), scaling)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """transformers' Llama RMSNorm of x (n, d): normalised in float32, cast back, times the weight (torch's
    rms_norm upcasts a bfloat16 or float16 x itself: the same values, with less Python)."""
    return norm.weight * F.rms_norm(x, x.shape[-1:], eps=norm.variance_epsilon)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, n, D) with cos and sign-folded sin (B, 1, D): x cos + swap_halves(x) sin_signed,
    which equals transformers' x cos + rotate_half(x) sin value for value."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin_signed


class FusedDecoder:
    """The decode step of a Llama-family model (see the module docstring)."""

    def __init__(self, model: Any, router: Any = None):
        cfg = model.config
        self.decoder = model.get_decoder()
        self.router = router
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        names = {id(m): n for n, m in model.named_modules()}
        self.layers = [self._layer(layer, names) for layer in self.decoder.layers]
        half = self.head_dim // 2
        self._sign = torch.cat([-torch.ones(half), torch.ones(half)])  # rotate_half's sign, folded into sin

    @staticmethod
    def _layer(layer: nn.Module, names: dict[int, str]) -> _Layer:
        att, mlp = layer.self_attn, layer.mlp
        mods = {"q": att.q_proj, "k": att.k_proj, "v": att.v_proj, "o": att.o_proj, "gate": mlp.gate_proj,
                "up": mlp.up_proj, "down": mlp.down_proj}
        return _Layer(layer.input_layernorm, layer.post_attention_layernorm, Linear(att.q_proj, att.k_proj, att.v_proj),
                      Linear(att.o_proj), Linear(mlp.gate_proj, mlp.up_proj), Linear(mlp.down_proj),
                      {k: names[id(m)] for k, m in mods.items()}, float(att.scaling), mlp.gate_proj.out_features)

    @classmethod
    def of(cls, model: Any, router: Any = None) -> FusedDecoder | None:
        """A FusedDecoder for `model`, or None where its layers are not exactly Llama's (see `unsupported`)."""
        return None if cls.unsupported(model) else cls(model, router)

    @staticmethod
    def unsupported(model: Any) -> str | None:
        """Why `model` cannot run the fused step (None: it can)."""
        cfg = model.config
        if getattr(cfg, "model_type", None) not in MODEL_TYPES:
            return f"model type {getattr(cfg, 'model_type', None)!r} is not one of {', '.join(MODEL_TYPES)}"
        if getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
            return f"hidden_act {cfg.hidden_act!r} is not silu"
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            return "pretraining_tp > 1"
        if getattr(cfg, "use_sliding_window", False) or (cfg.model_type == "mistral" and cfg.sliding_window):
            return "sliding-window attention"
        decoder = model.get_decoder()
        if not hasattr(decoder, "rotary_emb"):
            return "no shared rotary embedding module"
        for layer in decoder.layers:
            att, mlp = layer.self_attn, layer.mlp
            parts = [att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
            if any(type(p) is not nn.Linear for p in parts) or any(hasattr(att, n) for n in ("q_norm", "k_norm")):
                return "a decoder layer is not Llama's (projections wrapped, or q/k norms)"
            if not all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm)):
                return "a norm is not Llama's RMSNorm"
        return None

    def __call__(self, input_ids, mask, positions, cache) -> torch.Tensor:
        """One decode step: input_ids (B, 1), mask (B, S), positions (B, 1), cache -> final hidden states (B, d)."""
        x = self.decoder.embed_tokens(input_ids[:, 0])  # (B, d)
        cos, sin = self.rotary(x, positions)  # (B, 1, D) each
        bias = StepBias(mask)
        lora = self.routed()
        while len(cache.layers) < len(self.layers):  # an empty cache (a first token): its layers start now
            cache.layers.append(GrowingLayer())
        for layer, kv in zip(self.layers, cache.layers, strict=True):
            x = self.layer_step(layer, x, cos, sin, partial(_decode_attention, kv, bias, layer.scaling), lora)
        return self.final_norm(x)

    def routed(self) -> bool:
        """Whether rows are routed to a LoRA now (their deltas join this step's projections)."""
        return self.router is not None and self.router.active

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's last RMSNorm of x (n, d)."""
        return rms_norm(x, self.decoder.norm)

    def prefill(self, prompts: list[list[int]], every: bool = False) -> tuple[DynamicCache, torch.Tensor]:
        """Prefill prompts packed end to end, so that no matmul computes padding (each prompt attends causally to
        itself). Returns the batch's cache, left-padded to the longest prompt (zeros in the padding,
        batch.HEADROOM spare columns), and the final hidden state at each prompt's last token (B, d), or with
        `every`, at every token of the packing (N, d). Not for a forward
        with LoRA routes in force (the router's routes are rows; here a row is many tokens): run transformers'
        forward for those."""
        if self.router is not None and self.router.active:
            raise ValueError("the fused prefill does not apply LoRA routes: prefill these rows with forward_hidden")
        device = self.decoder.embed_tokens.weight.device
        pack = _Packing.of([len(p) for p in prompts], device)
        ids = torch.tensor([t for p in prompts for t in p], device=device)  # (N,)
        x = self.decoder.embed_tokens(ids)  # (N, d)
        cos, sin = self.rotary(x, pack.right[:, None])  # (N, 1, D)
        shape = (len(prompts), self.kv_heads, pack.width + HEADROOM, self.head_dim)
        buffers = [(x.new_zeros(shape), x.new_zeros(shape)) for _ in self.layers]
        last = len(self.layers) - 1
        for i, (layer, kv) in enumerate(zip(self.layers, buffers, strict=True)):
            attend = partial(self._prefill_attention, kv, pack, layer.scaling)
            x = self.layer_step(layer, x, cos, sin, attend, False, keep=pack.ends if i == last and not every else None)
        cache = new_cache([(k, v, pack.width) for k, v in buffers])
        return cache, self.final_norm(x)  # x: the last tokens' rows only, unless every

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (n, 1, D) at positions (n, 1), from the model's own rotary module."""
        cos, sin = self.decoder.rotary_emb(x, positions)  # in the model's dtype
        return cos, sin * self._sign.to(sin.device, sin.dtype)

    def _prefill_attention(self, kv, pack: _Packing, scaling: float, q, k, v) -> torch.Tensor:
        """Write the prompts' keys/values (N, Hkv, D) into the left-padded buffers kv, and attend: each prompt's
        queries (L, H, D) causally over its own keys, one sdpa call per prompt on views of the packing. (One call
        over the prompts right-padded to the longest computed the padding too: with prompts of 78-255 tokens the
        prefill went from 0.744/0.751 to 0.794/0.788 of vLLM's at 8/32 streams, `bench/decode.py --new-tokens 1
        --mixed`, and the bench's chat prompts of 55-78 tokens took the same time either way; SmolLM2, bf16, one
        AVX-512 core.) -> (N, H D)"""
        for buf, t in zip(kv, (k, v), strict=True):
            buf.transpose(1, 2)[pack.rows, pack.left] = t  # (B, S, Hkv, D) view: row, column
        split = zip(q.split(pack.lengths), k.split(pack.lengths), v.split(pack.lengths), strict=True)
        outs = [F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1),
                                               is_causal=True, scale=scaling, enable_gqa=True).transpose(0, 1)
                for qi, ki, vi in split]  # (L, H, D) each
        return torch.cat(outs).flatten(1)

    def layer_step(self, layer: _Layer, x, cos, sin, attend, lora: bool, keep=None) -> torch.Tensor:
        """One decoder layer on x (n, d); `attend(q, k, v)` stores the new keys/values and attends. `keep`: the rows
        to go on with after attention (the prefill's last layer needs the prompts' last tokens only). -> (n', d)"""
        n, h, hkv, d = x.shape[0], self.heads, self.kv_heads, self.head_dim
        hidden = rms_norm(x, layer.norm1)
        qkv = layer.qkv(hidden)  # (n, (H + 2 Hkv) D)
        if lora:
            self._lora_into(layer, (("q", h * d), ("k", hkv * d), ("v", hkv * d)), hidden, qkv)
        qk = rotate(qkv[:, : (h + hkv) * d].view(n, h + hkv, d), cos, sin)  # (n, H + Hkv, D)
        attn = attend(qk[:, :h], qk[:, h:], qkv[:, (h + hkv) * d:].view(n, hkv, d))  # (n, H D)
        if keep is not None:
            attn, x = attn[keep], x[keep]
        x = self._residual(layer, "o", attn, x, lora)
        hidden = rms_norm(x, layer.norm2)
        gate_up = layer.gate_up(hidden)  # (n, 2 I)
        if lora:
            self._lora_into(layer, (("gate", layer.inner), ("up", layer.inner)), hidden, gate_up)
        act = F.silu(gate_up[:, : layer.inner]) * gate_up[:, layer.inner:]  # (n, I)
        return self._residual(layer, "down", act, x, lora)

    def _residual(self, layer: _Layer, name: str, x, residual, lora: bool) -> torch.Tensor:
        """residual + projection `name` of x (its LoRA delta added first), rounded as transformers rounds it: the
        projection to the model's dtype, then the sum (oneDNN's fused residual add, one rounding, made greedy
        SmolLM2 text part from transformers' in bf16)."""
        y = getattr(layer, name)(x)
        delta = self.router.delta(layer.names[name], x[:, None]) if lora else None
        if delta is not None:
            y = (y.float() + delta[:, 0]).to(y.dtype)
        return y + residual

    def _lora_into(self, layer: _Layer, parts, hidden, out) -> None:
        """Add the routed LoRA deltas of projections `parts` ((name, width), in the order their outputs are
        concatenated in out (n, sum of widths)) to out, in place, as the router's hooks add them."""
        start = 0
        for name, width in parts:
            delta = self.router.delta(layer.names[name], hidden[:, None])
            if delta is not None:
                out[:, start:start + width] = (out[:, start:start + width].float() + delta[:, 0]).to(out.dtype)
            start += width
