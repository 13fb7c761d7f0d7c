"""Decode attention by grouped matmuls: the one-query-token case that dominates a decode step, done directly.

Contract: `use_decode_attention(model)` registers the attention implementation "reasonmaxxer" with
transformers' `AttentionInterface` (with sdpa's mask function) and sets it on `model` (idempotent; a model
whose implementation is not sdpa is left alone). A call with one query token per row (every decode step)
runs `decode_attention`: the query heads of each key/value group attend to their shared key/value head by
a view (no `repeat_kv` copy), scores q k^T * scaling by matmul in the model's dtype, the mask applied,
softmax in float32, cast back and multiplied by v: exactly transformers' eager attention, for GQA without
the copies. Every other call (prefill, several query tokens, dropout, a position bias, softcapping) runs
transformers' sdpa unchanged. On this CPU torch's sdpa kernels take 1.6x (bool mask) to 10x (no mask)
longer for a single query token against a 150-column cache. A row whose mask is False everywhere gets
zeros, not NaN (it never happens for a real row: its own position is always visible).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["NAME", "decode_attention", "grouped_decode", "plain_attention", "use_decode_attention"]

NAME = "reasonmaxxer"


def decode_attention(query, key, value, mask, scaling: float) -> torch.Tensor:
    """query (B, H, 1, D), key/value (B, Hkv, S, D), mask bool (B, 1|H, 1, S) or additive float, or None ->
    (B, 1, H, D), as transformers' attention functions return it."""
    b, h, _, d = query.shape
    s = key.shape[2]
    bias = None
    if mask is not None:
        m = mask[..., -s:]  # (B, 1|H, 1, S)
        bias = torch.zeros(m.shape, device=m.device).masked_fill_(~m, float("-inf")) if m.dtype == torch.bool \
            else m.float()
    out = grouped_decode(query.reshape(b, h, d), key, value, bias, scaling, guard=True)  # (B, H*D)
    return out.view(b, 1, h, d)


def grouped_decode(query, key, value, bias, scaling: float, guard: bool = False) -> torch.Tensor:
    """One query token per row against its cache, each group of query heads on its key/value head.

    query (B, H, D), key/value (B, Hkv, S, D) (views into buffers with spare columns are fine), bias: additive
    float32 mask (B, 1|H, 1, S) (0 where visible, -inf where not) or None -> (B, H*D) in value's dtype.
    Scores k q^T in the model's dtype, then scaling and the bias in float32 (one kernel), softmax in float32,
    cast back, times v: transformers' eager attention, for GQA without repeat_kv's copies. `guard`: a row that
    sees no column gets zeros instead of NaN (the decode step never needs it: every row sees its own column)."""
    b, h, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    g = h // hkv
    # Batched matmuls over the (B * Hkv) flattened heads, and k q^T rather than q k^T: the cache is a view into
    # buffers with spare columns, and CPU bf16 matmul takes slow paths for 4-d and transposed strided operands
    # (3.6x slower for q k^T at 1,000 columns); a transposed q is small.
    q = query.reshape(b * hkv, g, d)  # (B*Hkv, G, D): a group's query heads as rows
    k, v = key.flatten(0, 1), value.flatten(0, 1)  # (B*Hkv, S, D), views
    raw = torch.bmm(k, q.transpose(1, 2)).view(b, hkv, s, g).transpose(2, 3)  # (B, Hkv, G, S) model dtype
    if bias is None:
        scores = raw.float() * scaling
    else:
        bias = bias.reshape(bias.shape[0], 1, 1, s) if bias.shape[1] == 1 else bias.reshape(bias.shape[0], hkv, g, s)
        scores = torch.empty((b, hkv, g, s), device=raw.device)  # contiguous: add would follow raw's strides
        torch.add(bias, raw, alpha=scaling, out=scores)  # float32: bias + scaling * scores
    probs = torch.softmax(scores, dim=-1)
    if guard:
        probs = probs.nan_to_num(0.0)
    out = torch.bmm(probs.to(value.dtype).view(b * hkv, g, s), v)  # (B*Hkv, G, D)
    return out.view(b, h * d)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               is_causal: bool | None = None, position_bias=None, **kwargs):
    plain = (query.shape[2] == 1 and dropout == 0.0 and position_bias is None and kwargs.get("softcap") is None
             and not kwargs.get("output_attentions", False) and query.shape[1] % key.shape[1] == 0)
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return decode_attention(query, key, value, attention_mask, scale), None


def use_decode_attention(model) -> bool:
    """Route `model`'s attention through `_attention` (see the module docstring). Returns whether it does."""
    current = getattr(model.config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa":
        return False
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True


def plain_attention(model) -> None:
    """Give `model` transformers' sdpa back if `use_decode_attention` set ours."""
    if getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation("sdpa")
