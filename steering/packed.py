"""CPU fast path: oneDNN-prepacked weights for a model's linear layers (what inductor's freezing pass does).

Contract: `pack_linears(model)` gives every `nn.Linear` of `model` whose weight is a float32 or bfloat16 CPU
tensor a forward that runs `torch.ops.mkldnn._linear_pointwise` on a copy of its weight reordered once into
oneDNN's blocked layout. For decode-sized inputs that was 1.3-2.4x faster than `F.linear` on an AMD EPYC with
AVX-512 BF16 (bf16) and 1.1-1.7x on an AVX2-only one (float32, 8-32 rows, the weight in cache; 1.05-1.2x
with 30 layers' weights streamed from memory, as in a decode step; aten's matmuls do not use that layout),
with the same values to rounding (bit for bit on the first; tested to rounding). The layer falls back to
`F.linear` wherever the packed copy would be wrong or unsupported:
autograd on (training), inside a torch.compile graph (inductor lowers the linears itself: compiled.py),
an input of another dtype or device, a dtype this CPU's oneDNN cannot pack (bf16 needs AVX-512 or
AVX-NE-CONVERT: on an AVX2-only CPU such as AMD Zen 3 only float32 is packed), or a weight replaced or
changed in place since it was packed (its identity or version counter; a weight created under inference
mode has no counter, so an in-place change to one is not seen); a changed weight is repacked at its next
inference forward.
So the model stays the same model for every other user (PEFT wrapping, training, weight loading).
`unpack_linears(model)` restores the plain forwards and frees the packed copies. Cost: one extra copy of
each linear weight in memory.

oneDNN lays a packed weight out for an expected batch size, and which layout is fast depends on the CPU: on an
AVX2-only AMD EPYC (float32) the batch-1 layout ran 1.3-2.4x slower than a batched one at 2 to 32 rows and 1.2x
faster at exactly one, while vLLM's CPU linears were already on a batched layout. `layout(dtype)` chooses
between them once per process by measuring (`LAYOUTS`, timed on a probe layer over decode batches of 1, 8 and
32 rows); every packed weight of that dtype uses it, and `Engine.describe` names it in the server banner.
`pack_linears(model, batch=...)` fixes the layout instead (tests run both).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LAYOUTS", "Layout", "Linear", "available", "layout", "pack_linears", "packed_count", "unpack_linears"]

_DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = (1, 64)  # the batch sizes a packed weight may be laid out for: one row (GEMV), or a decode batch
PROBE_ROWS = (1, 8, 32)  # the decode batches `layout` times
PROBE_SHAPE = (1024, 1024)  # (out, in) of the layer it times: a decoder projection's size


def available(dtype: torch.dtype | None = None) -> bool:
    """Whether this torch build has the oneDNN linear kernels, and with `dtype`, whether they can pack a weight
    of that dtype on this CPU (tried once per process on a small layer)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return dtype is None or _packs(dtype)


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and runs a `dtype` linear here, and gives F.linear's values (to rounding)."""
    if dtype not in _DTYPES:
        return False
    with torch.no_grad():
        w, x = torch.randn(16, 32).to(dtype), torch.randn(2, 32).to(dtype)
        try:
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None,
                                                   "none", [], "")
        except RuntimeError:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
            return False
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2))


class Layout(NamedTuple):
    """The batch size packed weights are laid out for (one of LAYOUTS), and how it was chosen: `us`, the measured
    microseconds per call {layout: {rows: us}} (empty where it was fixed, not measured)."""

    batch: int
    us: dict[int, dict[int, float]]

    def describe(self) -> str:
        """For a banner: "laid out for batch 64 (measured: 1.21x batch 1's layout over 1-32 rows)"."""
        if not self.us:
            return f"laid out for batch {self.batch} (fixed)"
        other = next(b for b in self.us if b != self.batch)
        lo, hi = min(self.us[self.batch]), max(self.us[self.batch])
        gain = _score(self.us[other]) / _score(self.us[self.batch])
        return f"laid out for batch {self.batch} (measured: {gain:.2f}x batch {other}'s layout over {lo}-{hi} rows)"


def _score(us: dict[int, float]) -> float:
    """The geometric mean of a layout's times over the probed batches (each batch size counts alike)."""
    return math.exp(sum(math.log(t) for t in us.values()) / len(us))


def choose_layout(us: dict[int, dict[int, float]]) -> int:
    """The layout with the least geometric-mean time {layout: {rows: us}} (ties: the first in `us`, which `layout`
    fills in LAYOUTS order)."""
    return min(us, key=lambda b: _score(us[b]))


@functools.cache
def layout(dtype: torch.dtype) -> Layout:
    """The layout packed `dtype` weights use in this process: each of LAYOUTS timed on a random PROBE_SHAPE layer
    at PROBE_ROWS rows (best of 5 calls after a warm-up, ~35 ms in all on one AVX2 core), the fastest kept
    (`choose_layout`). The probe's weight sits in cache, so it shows the layouts' kernels apart (1.2x here); in a
    decode step, whose weights stream from memory, the same choice was worth 5-15% per linear. Its random
    numbers come from a generator of its own: the process's torch RNG is left as it was."""
    us: dict[int, dict[int, float]] = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(PROBE_SHAPE, generator=g).to(dtype)
        for batch in LAYOUTS:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)
            us[batch] = {}
            for rows in PROBE_ROWS:
                x = torch.randn(rows, PROBE_SHAPE[1], generator=g).to(dtype)
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                best = math.inf
                for _ in range(5):
                    start = time.perf_counter()
                    torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                    best = min(best, time.perf_counter() - start)
                us[batch][rows] = best * 1e6
    return Layout(choose_layout(us), us)


class _PackedForward:
    """The forward of one packed nn.Linear (an instance attribute, so hooks and PEFT wrapping still apply).
    `batch`: the layout, fixed when the layer is packed (None: this process's measured one)."""

    def __init__(self, module: nn.Linear, batch: int | None = None):
        self.module = module
        self.batch = layout(module.weight.dtype).batch if batch is None else batch
        self._pack()

    def _pack(self) -> None:
        w = self.module.weight
        self.source, self.version = w, _version(w)
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.batch)

    def __deepcopy__(self, memo: dict) -> _PackedForward:  # a copied model repacks its own weights lazily
        new = _PackedForward.__new__(_PackedForward)
        new.module, new.source, new.version, new.packed = copy.deepcopy(self.module, memo), None, -1, None
        new.batch = self.batch
        return new

    def __getstate__(self) -> dict:
        return {"module": self.module, "batch": self.batch, "source": None, "version": -1, "packed": None}

    def current(self) -> torch.Tensor | None:
        """The packed weight, repacked first if the weight was replaced or changed in place since; None where a
        packed copy must not be used (autograd on, a weight off the CPU or of a dtype this CPU cannot pack)."""
        w = self.module.weight
        if torch.is_grad_enabled() or w.device.type != "cpu":
            return None
        if w is not self.source or _version(w) != self.version:
            if not _packs(w.dtype):
                return None
            self._pack()
        return self.packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        w, b = m.weight, m.bias
        packed = None if torch.compiler.is_compiling() or x.dtype != w.dtype or x.device.type != "cpu" \
            else self.current()
        if packed is None:
            return F.linear(x, w, b)
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def _version(w: torch.Tensor) -> int | None:
    """The weight's version counter (None for an inference tensor, which has none: it is taken as unchanged)."""
    return None if w.is_inference() else w._version


def pack_linears(model: nn.Module, batch: int | None = None) -> int:
    """Pack every eligible linear layer of `model` (idempotent: a packed layer keeps its layout), laid out for
    `batch` rows (None: this process's measured `layout`). Returns how many are packed."""
    if not available():
        return 0
    for module in model.modules():
        if (type(module) is nn.Linear and not isinstance(module.__dict__.get("forward"), _PackedForward)
                and module.weight.device.type == "cpu" and _packs(module.weight.dtype)):
            module.forward = _PackedForward(module, batch)
    return packed_count(model)


def unpack_linears(model: nn.Module) -> None:
    """Give every packed layer of `model` its plain forward back."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _PackedForward):
            del module.forward


def packed_count(model: nn.Module) -> int:
    return sum(isinstance(m.__dict__.get("forward"), _PackedForward) for m in model.modules())


class Linear:
    """Linear layers run directly: `Linear(*layers)(x)` (fused.py's step).

    One layer runs on its own packed copy where `pack_linears` packed it (no new memory), else with `F.linear`.
    Several layers that read the same input (q, k and v; gate and up) run as one matmul on a packed copy of their
    concatenated weights, returning the concatenated outputs, where all of them were packed when this was made;
    their own packed copies are then released (their module forwards, the path of any other caller, run
    `F.linear` again), so packing the group costs no more memory than packing each did. The copy is repacked
    when any weight changes. Unpacked: separate `F.linear`s, concatenated. Each output column is computed as
    the layer alone computes it (the same values: tested).
    """

    def __init__(self, *layers: nn.Linear):
        self.layers = layers
        self.bias: torch.Tensor | None = None  # the concatenated bias, made with the packed copy
        self._packed: torch.Tensor | None = None
        self._sources: list = []
        forwards = [m.__dict__.get("forward") for m in layers]
        self.group = len(layers) > 1 and all(isinstance(f, _PackedForward) for f in forwards)
        self.batch = forwards[0].batch if self.group else None  # the layers' layout (fixed when they were packed)
        with torch.no_grad():  # weight() packs only with grad off
            if self.group and self.weight() is not None:
                for m in layers:
                    del m.forward  # the group's copy replaces theirs

    def weight(self) -> torch.Tensor | None:
        """The packed weight to use now (None: run F.linear)."""
        if len(self.layers) == 1:
            fwd = self.layers[0].__dict__.get("forward")
            return fwd.current() if isinstance(fwd, _PackedForward) else None
        ws = [m.weight for m in self.layers]
        if not self.group or torch.is_grad_enabled() or ws[0].device.type != "cpu" or not _packs(ws[0].dtype):
            return None
        sources = [(w, _version(w)) for w in ws]
        if self._packed is None or any(a is not w or va != vw
                                       for (a, va), (w, vw) in zip(self._sources, sources, strict=True)):
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in ws]), self.batch)
                self.bias = None if self.layers[0].bias is None else torch.cat([m.bias.detach() for m in self.layers])
            self._sources = sources
        return self._packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.weight() if x.device.type == "cpu" and x.dtype == self.layers[0].weight.dtype
             and not torch.compiler.is_compiling() else None)  # in a graph: inductor's linears (compiled.py)
        if w is not None:
            bias = self.layers[0].bias if len(self.layers) == 1 else self.bias
            return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
        outs = [F.linear(x, m.weight, m.bias) for m in self.layers]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
