"""A compiled decode step: `torch.compile` of the decoder for one-token steps, with a clean fallback to eager.

Contract: `CompiledDecoder(model)` is called like `batch.forward_hidden` (input ids (B, 1), mask (B, S),
positions (B, 1), the batch's cache) and returns the same hidden states (B, d) as the eager decoder, up to
float rounding of fused kernels. Shapes are dynamic (`dynamic=True`): the batch size and the cache length
are symbolic, so two graphs (batch size 1, and any larger: dynamo specialises a size of 1) serve every
batch as rows join and leave and as the cache grows: no buckets to pad to and no recompiles. The cache's
buffers (batch.GrowingLayer) are written in place inside the graph; room for the step is reserved before
it, eagerly, so the graph never takes the growing branch. Prefills, gated-LoRA recomputes and
teacher forwards stay eager. If compiling or running the graph fails, it warns once, names the error,
and runs eager from then on: compile is an optimisation, never a reason for a request to fail.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .batch import cache_kwarg, decoder_hidden

__all__ = ["CompiledDecoder"]


def _prepare(input_ids, mask, positions, cache) -> None:
    """Before a compiled step: contiguous cache buffers, room reserved for this step and one more (so the
    graph's guards on the buffers' sizes keep holding), and the batch and length axes marked dynamic from the
    first call (else the first graph is specialised to its shapes and the second call recompiles)."""
    mark = torch._dynamo.maybe_mark_dynamic
    for t in (input_ids, positions):
        mark(t, 0)
    mark(mask, 0)
    mark(mask, 1)
    for layer in cache.layers:
        layer.compact()  # a view of the buffers would have another stride pattern (a recompile)
        layer.reserve(layer._n + 2)
        for buf in (layer._k, layer._v):
            mark(buf, 0)
            mark(buf, 2)


class CompiledDecoder:
    """The decoder of `model`, compiled for decode steps (see the module docstring)."""

    def __init__(self, model: Any):
        self.decoder = model.get_decoder()
        self.kwarg = cache_kwarg(self.decoder)  # asked of the plain module: the compiled one takes **kwargs
        self.compiled = torch.compile(self.decoder, dynamic=True)
        self.failed: str | None = None  # why compile was given up, once it was

    def __call__(self, input_ids, mask, positions, cache) -> torch.Tensor:
        if self.failed is None:
            _prepare(input_ids, mask, positions, cache)
            try:
                return decoder_hidden(self.compiled, self.kwarg, input_ids, mask, positions, cache)
            except Exception as e:  # any compiler failure: fall back, say why, once
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                warnings.warn(f"the compiled decode step failed ({self.failed}); running eager from now on",
                              RuntimeWarning, stacklevel=2)
        return decoder_hidden(self.decoder, self.kwarg, input_ids, mask, positions, cache)
