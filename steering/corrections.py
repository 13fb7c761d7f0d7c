"""Correction sources behind one interface: how a head, a LoRA or a teacher changes the logits where the gate fires.

Contract: a correction source (an adapter artifact, or a teacher) has `name` and `manifest`; its kind is
`manifest.kind`, and `correction_of(source)` is the `Correction` registered for that kind (`register`). The decode
engine, prompt scoring (echo) and the vLLM engine dispatch through it, never on the source's class:
- `prepare(engine, source)` at registration, off the engine's lock (a head's weights onto the model's device, a
  teacher's own fast view); `attach` / `detach` under the lock and at release (a LoRA joins the engine's router);
- `every_forward(steering)`: the source runs in every forward of a row (a LoRA in mode always: its KV cache is the
  adapted model's), so the gate never applies it on top;
- `runs_model`: its correction runs a model, so the step reads the fired mask first and corrects fired rows only;
- `start(row)`: per-request state (a teacher's lazy KV cache);
- `steer(engine, rows, idx, batch, hidden, logits, fired, out)`: the corrected logits of rows `idx` (every row of
  this kind that may fire; fired ones only where `runs_model`), written into `out`, which is returned (it is
  `logits` itself until a source writes: the first to write clones);
- `score(engine, adapter, prompt, sel, hidden, logits, gate)`: the corrected logits of the fired prompt positions
  `sel` of one prompt chunk (prompt_logprobs.py);
- `vllm`: how vLLM runs it: "processor" (our logits processor), "lora" (vLLM's LoRA kernels, mode always only) or
  None (it cannot: refused with the fix).
Adding a source: a module with its artifact (a class with `load`, `save`, `validate`, `name`, `manifest`) and its
`Correction`, and one `register(correction, artifact=...)` call here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from .adapters import ARTIFACTS, HeadAdapter, LoraAdapter
from .attention import use_decode_attention
from .batch import new_cache, step_hidden
from .gate import topk_candidates
from .manifest import KINDS
from .own import own_view
from .packed import pack_linears
from .request import SteeringParams
from .teacher import TeacherCursor, next_logits, restrict

__all__ = ["Correction", "CorrectionBase", "PromptChunk", "correction_of", "register"]


@dataclass
class PromptChunk:
    """One chunk of one prompt being scored: its ids (1, n), the base cache of the columns before, the first
    column, and per-prompt state a source keeps across chunks (a teacher's hidden states)."""

    x: torch.Tensor
    cache: Any
    start: int
    state: dict[str, Any] = field(default_factory=dict)


class Correction(Protocol):
    kind: ClassVar[str]
    runs_model: ClassVar[bool]
    vllm: ClassVar[str | None]

    def prepare(self, engine: Any, source: Any) -> Any: ...

    def attach(self, engine: Any, source: Any) -> None: ...

    def detach(self, engine: Any, name: str) -> None: ...

    def every_forward(self, steering: SteeringParams) -> bool: ...

    def start(self, row: Any) -> None: ...

    def steer(self, engine: Any, rows: list, idx: list[int], batch: Any, hidden: torch.Tensor, logits: torch.Tensor,
              fired: torch.Tensor, out: torch.Tensor) -> torch.Tensor: ...

    def score(self, engine: Any, adapter: Any, prompt: PromptChunk, sel: torch.Tensor, hidden: torch.Tensor,
              logits: torch.Tensor, gate: SteeringParams) -> torch.Tensor: ...


_REGISTRY: dict[str, Correction] = {}


def register(correction: Correction, artifact: type | None = None) -> None:
    """Make a kind of correction source known to every backend (by `correction.kind`, its manifests' kind), and
    with `artifact` (a class with `load(directory)`) to `load_adapter`, for sources that are adapter folders."""
    _REGISTRY[correction.kind] = correction
    if correction.kind not in KINDS:
        KINDS.append(correction.kind)  # adapter.json may declare it
    if artifact is not None:
        ARTIFACTS[correction.kind] = artifact


def correction_of(source: Any) -> Correction:
    """The `Correction` of a source, by its manifest's kind (KeyError naming the kinds there are)."""
    kind = source.manifest.kind
    if kind not in _REGISTRY:
        raise KeyError(f"no correction is registered for kind {kind!r}: the kinds are {', '.join(_REGISTRY)}")
    return _REGISTRY[kind]


class CorrectionBase:
    """What most sources do: nothing to prepare or attach, never in every forward, no per-request state."""

    runs_model: ClassVar[bool] = False

    def prepare(self, engine: Any, source: Any) -> Any:
        return source

    def attach(self, engine: Any, source: Any) -> None:
        pass

    def detach(self, engine: Any, name: str) -> None:
        pass

    def every_forward(self, steering: SteeringParams) -> bool:
        return False

    def start(self, row: Any) -> None:
        pass


class HeadCorrection(CorrectionBase):
    """logits[c] += scale * W_U[c] (B A h) on the base top-k candidates c: no extra forward, the base's cache."""

    kind, vllm = "head", "processor"

    def prepare(self, engine: Any, source: HeadAdapter) -> HeadAdapter:
        return source.to(engine.model.device)  # once, not on every step

    def steer(self, engine, rows, idx, batch, hidden, logits, fired, out):
        """Applied on the device to every row that uses a head, where fired (no host sync); on the CPU, where
        reading the fired mask is free, to the fired rows only (and not at all in a step with none)."""
        groups: dict[tuple[str, int], list[int]] = {}
        for i in idx:
            groups.setdefault((rows[i].adapter.name, rows[i].steering.top_k), []).append(i)
        if logits.device.type == "cpu":
            on = fired.tolist()
            groups = {key: kept for key, ids in groups.items() if (kept := [i for i in ids if on[i]])}
        if not groups:
            return out
        w_u = engine.lm_head.weight
        if out is logits and len(groups) == 1 and len(next(iter(groups.values()))) == len(rows):  # no gathers
            (_name, k), = groups
            return logits.scatter_add(1, *_head_delta(rows[0].adapter, k, hidden, logits, fired, w_u))
        out = logits.clone() if out is logits else out
        for (_name, k), ids in groups.items():
            sel = torch.tensor(ids, device=logits.device)
            out[sel] = logits[sel].scatter_add(1, *_head_delta(rows[ids[0]].adapter, k, hidden[sel], logits[sel],
                                                               fired[sel], w_u))
        return out

    def score(self, engine, adapter, prompt, sel, hidden, logits, gate):
        cand = topk_candidates(logits[sel], gate.top_k)  # (f, k)
        delta = adapter.delta(hidden[sel], cand, engine.lm_head.weight)  # (f, k)
        return logits[sel].scatter_add(1, cand, delta)


def _head_delta(adapter: HeadAdapter, k: int, hidden, logits, fired, w_u) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's correction of rows (hidden (n, d), logits (n, V), fired (n,)): its top-k candidates (n, k) and
    their deltas (n, k), 0 where the gate did not fire."""
    cand = topk_candidates(logits, k)  # (n, k)
    delta = adapter.delta(hidden, cand, w_u)  # (n, k)
    return cand, delta * fired[:, None].to(delta.dtype)


class LoraCorrection(CorrectionBase):
    """A PEFT LoRA: in mode always, the row's every forward (its cache the adapted model's); gated, the fired
    rows' current position recomputed with the LoRA on over the base cache (the recompute's key/value
    discarded), every fired LoRA row in one forward whatever its adapter (the router batches them)."""

    kind, vllm, runs_model = "lora", "lora", True

    def attach(self, engine, source) -> None:
        engine.lora.add(source)

    def detach(self, engine, name: str) -> None:
        engine.lora.remove(name)

    def every_forward(self, steering: SteeringParams) -> bool:
        return steering.mode == "always"

    def steer(self, engine, rows, idx, batch, hidden, logits, fired, out):
        out = logits.clone() if out is logits else out
        sel = torch.tensor(idx, device=batch.mask.device)
        cache, mask = batch.without_last_column(sel)
        current, position = batch.last_inputs()
        with engine.lora.route(engine.routes([rows[i].adapter.name for i in idx])):
            h = step_hidden(engine.model, engine.fused, current[sel, None], mask, position[sel, None], cache)
        out[idx] = engine.lm_head(h).float()
        return out

    def score(self, engine, adapter, prompt, sel, hidden, logits, gate):
        return torch.stack([_recompute(engine, prompt.x, prompt.cache, prompt.start + i, adapter.name)
                            for i in sel.tolist()])


def _recompute(engine, x: torch.Tensor, cache, col: int, name: str) -> torch.Tensor:
    """Logits at prompt column `col` with LoRA `name` on, over the base cache of columns < col. -> (V,)"""
    data = [(layer.keys[:, :, :col], layer.values[:, :, :col]) for layer in cache.layers] if col else None
    device = x.device
    mask = torch.ones((1, col + 1), dtype=torch.long, device=device)
    with engine.lora.route({name: torch.zeros(1, dtype=torch.long, device=device)}):
        h = step_hidden(engine.model, engine.fused, x[:, col:col + 1], mask, torch.tensor([[col]], device=device),
                        new_cache(data))
    return engine.lm_head(h).float()[0]


class TeacherCorrection(CorrectionBase):
    """A second model: where fired, its logits restricted to the base top-k candidates (k = 0: all), from the
    row's lazy teacher cache (one forward over the tokens it has not seen; the fired rows of one teacher in
    batched forwards). The row's own cache stays the base model's."""

    kind, vllm, runs_model = "teacher", None, True

    def prepare(self, engine, source):
        if not engine.fast:
            return source
        source = dataclasses.replace(source, model=own_view(source.model))  # its fast paths on a view of its own
        pack_linears(source.model)
        use_decode_attention(source.model)
        return source

    def start(self, row) -> None:
        if row.steering.mode != "off":
            row.cursor = TeacherCursor(row.adapter)
            row.report.teacher_tokens = 0

    def steer(self, engine, rows, idx, batch, hidden, logits, fired, out):
        out = logits.clone() if out is logits else out
        by_teacher: dict[int, list[int]] = {}
        for i in idx:
            by_teacher.setdefault(id(rows[i].cursor.teacher), []).append(i)
        for ids in by_teacher.values():
            before = [rows[i].cursor.tokens for i in ids]
            texts = [rows[i].request.prompt_ids + rows[i].token_ids for i in ids]
            for i, was, t in zip(ids, before, next_logits([rows[i].cursor for i in ids], texts), strict=True):
                rows[i].report.teacher_tokens += rows[i].cursor.tokens - was
                out[i] = restrict(t.to(logits.device), logits[i], rows[i].steering.top_k)
        return out

    def score(self, engine, adapter, prompt, sel, hidden, logits, gate):
        if "hidden" not in prompt.state:  # one teacher forward over the whole prompt, at its first fired position
            model = adapter.model
            x = prompt.x.to(model.device)
            out = model.get_decoder()(input_ids=x, attention_mask=torch.ones_like(x),
                                      position_ids=torch.arange(x.shape[1], device=model.device)[None])
            prompt.state["hidden"] = out.last_hidden_state[0]  # (n, d_t)
        h = prompt.state["hidden"]
        t = adapter.lm_head(h[(prompt.start + sel).to(h.device)]).float()  # (f, V_t)
        return restrict(t.to(logits.device), logits[sel], gate.top_k)


register(HeadCorrection(), artifact=HeadAdapter)
register(LoraCorrection(), artifact=LoraAdapter)
register(TeacherCorrection())  # a model folder, not an adapter: teacher.load_teacher
