"""A compiled decode step: `torch.compile` of the decode step, with a clean fallback to eager.

Contract: `CompiledDecoder(model, fused)` is called like `batch.forward_hidden` (input ids (B, 1), mask (B, S),
positions (B, 1), the batch's cache) and returns the same hidden states (B, d) as the eager step, up to float
rounding of fused kernels. Two graphs, by the model:
- a Llama-family model (`fused`, fused.py's FusedDecoder, given): the fused step's own arithmetic
  (`FusedDecoder.layer_step`, one definition) compiled with inductor's freezing: the weights become constants,
  which it packs for its own CPU linears (MKL for float32, oneDNN for bf16; q/k/v and gate/up concatenated,
  `cpp.enable_concat_linear`), and it
  fuses the elementwise work between them (RMSNorm, rotary, SiLU, residual adds, the attention's softmax) into
  a few C++ loops, with none of eager's per-op dispatch. The new keys and values are written into the cache's
  buffers inside the graph (`index_copy_` at the step's column); attention reads the filled columns alone, as
  reductions that inductor turns into one loop each (`_attend`). Rows routed to a LoRA take the eager fused step
  (its deltas are per-row Python routing). Freezing reads the weights once, at the first compile: the engine's
  own view of the model (own.py) never changes its weights, and nothing else may.
- any other model: its transformers decoder compiled (the linears inductor's, unfrozen).
Shapes are dynamic (the batch and cache-width axes marked; `dynamic=True` for transformers' decoder): the batch
size and the cache width are symbolic, so two graphs (batch size
1, and any larger: dynamo specialises a size of 1) serve every batch as rows join and leave and as the cache
grows: no buckets to pad to and no recompiles. Room for the step is reserved in the buffers before it, eagerly.
Prefills, gated-LoRA recomputes and teacher forwards stay eager. If compiling or running the graph fails, it
warns once, names the error, and runs eager from then on: compile is an optimisation, never a reason for a
request to fail.
"""

from __future__ import annotations

import types
import warnings
from functools import partial
from typing import Any

import torch
import torch._inductor.config
from torch import nn

from .batch import cache_kwarg, decoder_hidden
from .fused import StepBias

__all__ = ["OPTIONS", "CompiledDecoder"]

OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True}  # inductor's config for the fused step's graph


def _mark(input_ids, positions, buffers) -> None:
    """Mark the batch and width axes dynamic from the first call (else the first graph is specialised to its
    shapes and the second call recompiles)."""
    mark = torch._dynamo.maybe_mark_dynamic
    for t in (input_ids, positions):
        mark(t, 0)
    for buf in buffers:
        mark(buf, 0)
        mark(buf, 2)


def _prepare(input_ids, mask, positions, cache) -> None:
    """Before a compiled transformers step: contiguous cache buffers, room reserved for this step and one more (so
    the graph's guards on the buffers' sizes keep holding), dynamic axes marked."""
    for layer in cache.layers:
        layer.compact()  # a view of the buffers would have another stride pattern (a recompile)
        layer.reserve(layer._n + 2)
    _mark(input_ids, positions, [b for layer in cache.layers for b in (layer._k, layer._v)])
    torch._dynamo.maybe_mark_dynamic(mask, 0)
    torch._dynamo.maybe_mark_dynamic(mask, 1)


def _attend(keys, values, column, bias, scaling: float, q, k, v) -> torch.Tensor:
    """The fused step's decode attention on bare buffers (no cache object, so the graph holds it): write k and v
    (B, Hkv, D) into keys/values (B, Hkv, W, D) in place at `column` ((1,) int64), then attend with q (B, H, D)
    over the filled columns alone (bias (B, 1, 1, n): each row's padding masked; n = column + 1, a symbolic
    size). -> (B, H D)

    As reductions, not matmuls: inductor makes each of q k^T, the softmax and p v one C++ loop over the filled
    columns, reading the buffers in place (a view); on batched matmuls it would copy the views or read the spare
    columns too. At 32 streams of SmolLM2 (float32, one AVX2 EPYC core) 30 layers' attention took 26 ms this way
    against 37 ms as `grouped_decode` in the graph and 32 ms eager. Scores are summed in float32 where eager's
    matmul rounds them to the model's dtype first: the same to rounding."""
    keys.index_copy_(2, column, k[:, :, None])
    values.index_copy_(2, column, v[:, :, None])
    b, h, d = q.shape
    hkv, n = keys.shape[1], bias.shape[-1]
    g = h // hkv
    keys, values = keys[:, :, :n, None], values[:, :, :n, None]  # (B, Hkv, n, 1, D) views
    raw = (keys * q.view(b, hkv, 1, g, d)).sum(-1)  # (B, Hkv, n, G)
    scores = raw.float().transpose(2, 3) * scaling + bias  # (B, Hkv, G, n) float32
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = (probs.transpose(2, 3)[..., None] * values).sum(2)  # (B, Hkv, G, D)
    return out.reshape(b, h * d)


def _own_code(fn):
    """`fn` with a code object of its own. Dynamo keeps compiled graphs per code object and stops compiling one after
    `recompile_limit` graphs (8); a frozen graph holds its engine's weights, so every engine needs graphs of its own,
    and a process may hold many engines (tests, benchmarks): each engine's step gets its own code object, whose
    graphs are freed with it."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _FusedStep(nn.Module):
    """The fused decode step as a module over the model's decoder (its parameters are the graph's, for freezing):
    ids (B,), positions (B,), bias (B, 1, 1, W), column (1,), keys and values per layer -> hidden (B, d)."""

    def __init__(self, fused: Any):
        super().__init__()
        self.decoder = fused.decoder  # registered: its weights are what freezing folds
        self.fused = [fused]  # a list: not a submodule (FusedDecoder is not one)

    def forward(self, ids, positions, bias, column, keys: list, values: list) -> torch.Tensor:
        fused = self.fused[0]
        x = self.decoder.embed_tokens(ids)  # (B, d)
        cos, sin = fused.rotary(x, positions[:, None])  # (B, 1, D)
        for layer, k, v in zip(fused.layers, keys, values, strict=True):
            x = fused.layer_step(layer, x, cos, sin, partial(_attend, k, v, column, bias, layer.scaling), False)
        return fused.final_norm(x)


class CompiledDecoder:
    """The decode step of `model` compiled (see the module docstring): the fused step where `fused` is given."""

    def __init__(self, model: Any, fused: Any = None):
        self.fused = fused
        self.decoder = model.get_decoder()
        self.kwarg = cache_kwarg(self.decoder)  # asked of the plain module: the compiled one takes **kwargs
        if fused is not None:
            step = _FusedStep(fused)
            step.forward = types.MethodType(_own_code(_FusedStep.forward), step)
            self.compiled = torch.compile(step)  # dynamic axes: marked
        else:
            self.compiled = torch.compile(self.decoder, dynamic=True)
        self.failed: str | None = None  # why compile was given up, once it was

    def __call__(self, input_ids, mask, positions, cache) -> torch.Tensor:
        if self.failed is None and not (self.fused is not None and self.fused.routed()):
            try:
                if self.fused is not None:
                    return self._fused_step(input_ids, mask, positions, cache)
                _prepare(input_ids, mask, positions, cache)
                return decoder_hidden(self.compiled, self.kwarg, input_ids, mask, positions, cache)
            except Exception as e:  # any compiler failure: fall back, say why, once
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                warnings.warn(f"the compiled decode step failed ({self.failed}); running eager from now on",
                              RuntimeWarning, stacklevel=2)
        if self.fused is not None:
            return self.fused(input_ids, mask, positions, cache)
        return decoder_hidden(self.decoder, self.kwarg, input_ids, mask, positions, cache)

    def _fused_step(self, input_ids, mask, positions, cache) -> torch.Tensor:
        """The compiled fused step on the batch's cache: room for this step's column and one more reserved in every
        layer's buffers (so the filled width n stays below the buffers' W: dynamo would specialise n == W, the
        slice being the whole buffer), the graph writes the column, then each layer counts it."""
        layers = cache.layers
        if len(layers) != len(self.fused.layers) or any(layer._k is None for layer in layers):
            return self.fused(input_ids, mask, positions, cache)  # an empty cache: the eager step starts it
        column = layers[0]._n
        for layer in layers:
            layer.compact()
            layer.reserve(column + 2)  # a spare column after this step's: the graph slices n < W (n == W: a recompile)
        keys, values = [layer._k for layer in layers], [layer._v for layer in layers]
        bias = StepBias(mask)(column + 1)  # (B, 1, 1, n): the filled columns, this step's included
        ids, positions = input_ids[:, 0], positions[:, 0]  # (B,)
        _mark(ids, positions, keys + values)
        torch._dynamo.maybe_mark_dynamic(bias, 0)
        torch._dynamo.maybe_mark_dynamic(bias, 3)
        with torch._inductor.config.patch(OPTIONS):  # in force when it compiles (torch.compile's options= is not)
            hidden = self.compiled(ids, positions, bias, torch.tensor([column], device=bias.device), keys, values)
        for layer in layers:
            layer._n = column + 1
        return hidden
