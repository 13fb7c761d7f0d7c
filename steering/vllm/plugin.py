"""The vLLM side of steering: a logits layer that keeps the final hidden state, and a logits processor
that gates and applies `head` adapters per request inside vLLM's sampler.

Loaded by vLLM, never imported by code that runs without vLLM:
- `register()` is our `vllm.general_plugins` entry point. vLLM calls it in every process it starts; it
  checks the vLLM version and swaps vLLM's `LogitsProcessor` layer for `HiddenKeepingLogits`, which
  computes the logits exactly as vLLM does and keeps the hidden states of the sampled rows (one
  reference per step, no copy) for the processor below.
- `GateLogitsProcessor` is a V1 logits processor (pass `logits_processors=[PROCESSOR]` to the engine;
  vLLM's own server: `--logits-processors reasonmaxxer.steering.vllm.plugin:GateLogitsProcessor`).
  Per-request settings travel in `SamplingParams.extra_args["reasonmaxxer"]` (`vllm_xargs` over HTTP):
  {"rid": str, "mode": "off"|"gated"|"always", "tau": float, "adapter": dir or null, "kind": "head"|"lora",
   "top_k": int, "trace": bool}. Rows without it are not touched and cost nothing. For steered rows it
  computes the base entropy (fp32), fires where entropy > tau (strict; off: never, always: every row),
  and adds scale * W_U[c] (B A h) on the base top-k candidates c of fired `head` rows; it is computed for
  every head row and multiplied by the fired mask, so the step needs no host synchronisation (on the
  CPU, where that costs nothing, only the fired rows are touched). `lora`
  rows are adapted by vLLM's native LoRA (always mode only); the processor only reports them.
- Gate records go to the serving process through `reports.ReportSender`.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from reasonmaxxer.steering.gate import entropy, random_fire, topk_candidates

from . import XARGS_KEY, check_vllm_version, parse_xargs
from .reports import ReportSender

__all__ = ["PROCESSOR", "GateLogitsProcessor", "HiddenKeepingLogits", "register"]

PROCESSOR = "reasonmaxxer.steering.vllm.plugin:GateLogitsProcessor"


class _Stash(threading.local):
    """The last logits computation of this worker thread: vLLM's layer -> our sampler-side processor."""

    hidden: torch.Tensor | None = None
    lm_head: torch.nn.Module | None = None


_STASH = _Stash()  # per worker process (and thread): vLLM builds the layer and the processor separately


class HiddenKeepingLogits(VllmLogitsLayer):
    """vLLM's logits layer, unchanged, plus a reference to the hidden states it was given."""

    def forward(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False):
        # Called unbound by vLLM's LoRA wrapper too, so no zero-argument super().
        logits = VllmLogitsLayer.forward(self, lm_head, hidden_states, embedding_bias, skip_gather)
        _STASH.hidden, _STASH.lm_head = hidden_states, lm_head
        return logits


def register() -> None:
    """vLLM general plugin: check the version, install the hidden-keeping logits layer (idempotent)."""
    check_vllm_version()
    from vllm.model_executor.custom_op import op_registry_oot

    if op_registry_oot.get("LogitsProcessor") is not HiddenKeepingLogits:
        VllmLogitsLayer.register_oot(HiddenKeepingLogits, name="LogitsProcessor")


@dataclass
class _Row:
    rid: str
    mode: str
    tau: float
    adapter: str | None
    kind: str
    top_k: int
    trace: bool
    output_ids: list[int]  # vLLM's live list: its length is the position of the next token
    rate: float | None  # mode random: the coin's probability
    key: int  # mode random: the coin's key


class _HeadCache:
    """Head adapters by directory, loaded once per worker onto its device (LRU, 32 entries)."""

    def __init__(self, device: torch.device, size: int = 32):
        self.device, self.size = device, size
        self._items: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, float]] = OrderedDict()

    def get(self, path: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        if path not in self._items:
            from reasonmaxxer.steering.adapters import HeadAdapter

            a = HeadAdapter.load(path)
            self._items[path] = (a.A.to(self.device), a.B.to(self.device), a.scale)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(path)
        return self._items[path]


class GateLogitsProcessor(LogitsProcessor):
    """Entropy gate + `head` correction for the rows whose request carries reasonmaxxer extra_args."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, _Row] = {}
        self.heads = _HeadCache(device)
        self.sender = ReportSender.from_env() if _is_reporting_rank() else None
        self._plan: _Plan | None = None

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_xargs(sampling_params.extra_args)  # ValueError -> HTTP 400 in vLLM's server

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            x = parse_xargs(params.extra_args) if params is not None else None
            if x is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(x["rid"], x["mode"], x["tau"], x["adapter"], x["kind"], x["top_k"],
                                        x["trace"], output_ids, x["rate"], x["key"])
        for a, b, direction in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if rb is not None and direction == MoveDirectionality.SWAP:
                self.rows[a] = rb
        self._plan = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self._plan is None:
            self._plan = _Plan.build(self.rows, self.device)
        plan = self._plan
        whole = plan.covers(logits.shape[0])
        base = logits if whole else logits[plan.index]  # (m, V): a view when every row is ours, else a copy
        ent = entropy(base)  # (m,)
        fired = ent > plan.tau  # (m,) strict; off and random rows have tau = +inf, always rows -inf
        if plan.random:  # the random-position control: a seeded coin per row instead of the gate
            rs = [plan.rows[j] for j in plan.random]
            coins = [random_fire(r.key, len(r.output_ids), r.rate) for r in rs]
            fired[plan.random_index] = torch.tensor(coins, device=fired.device)
        base_tok = base.argmax(-1) if plan.any_trace and self.sender is not None else None  # before any change
        for group in plan.heads:
            self._head(logits, base, fired, group, plan)
        if self.sender is not None:
            meta = [(r.rid, len(r.output_ids)) for r in plan.rows]
            self.sender.put(meta, ent, fired, base_tok, _event_if_cuda(ent))
        return logits

    def _head(self, logits: torch.Tensor, base: torch.Tensor, fired: torch.Tensor, group: _HeadGroup, plan: _Plan):
        """Add one head adapter's correction to its rows' top-k candidates, in place, where fired.

        On an accelerator every row of the group is corrected and the correction multiplied by the fired
        mask (no host synchronisation); on the CPU, where reading the mask costs nothing, only the rows
        that fired are touched (at a 3% fire rate that skips the top-k of almost every row)."""
        A, B, scale = self.heads.get(group.path)
        sel, hit, keep, whole = group.sel, fired[group.sel], group.keep, group.whole
        if logits.device.type == "cpu":
            fired_pos = hit.nonzero().squeeze(1)  # (n',)
            if fired_pos.numel() == 0:
                return
            sel, hit, whole = sel[fired_pos], hit[fired_pos], False
            keep = None if keep is None else keep[fired_pos]
        rows = plan.index[sel]  # (n,) batch rows
        sub = base if whole else base[sel]  # (n, V) base logits (untouched by other groups)
        cand = topk_candidates(sub, group.k)  # (n, k)
        hidden = _STASH.hidden[rows].float()  # (n, d)
        u = (hidden @ A.T) @ B.T  # (n, d)
        w = _unembed_rows(_STASH.lm_head, cand)  # (n, k, d)
        delta = scale * torch.einsum("nkd,nd->nk", w, u) * hit[:, None]  # (n, k), 0 where not fired
        if keep is not None:  # rows asking for fewer candidates than the group's largest k
            delta = delta * keep
        logits.index_put_((rows[:, None].expand_as(cand), cand), delta, accumulate=True)


@dataclass
class _HeadGroup:
    path: str  # adapter directory
    sel: torch.Tensor  # (n,) positions into _Plan.index of this adapter's rows
    k: int  # the largest candidate count its rows ask for
    keep: torch.Tensor | None  # (n, k) which candidates each row keeps, None when all ask for k
    whole: bool  # its rows are all of _Plan.index (sel is 0..m-1)


@dataclass
class _Plan:
    """Device tensors of the current batch composition, rebuilt only when the batch changes."""

    rows: list[_Row]
    index: torch.Tensor  # (m,) batch rows we steer or report
    tau: torch.Tensor  # (m,)
    heads: list[_HeadGroup]
    any_trace: bool
    dense: bool  # index is 0..m-1
    random: list[int]  # positions (into index) of mode-random rows
    random_index: torch.Tensor

    def covers(self, batch: int) -> bool:
        """Every row of a batch of `batch` rows is ours, in order: work on the logits without copying."""
        return self.dense and len(self.rows) == batch

    @classmethod
    def build(cls, rows: dict[int, _Row], device: torch.device) -> _Plan:
        order = sorted(rows)
        rs = [rows[i] for i in order]
        taus = [{"off": math.inf, "random": math.inf, "always": -math.inf}.get(r.mode, r.tau) for r in rs]
        random = [j for j, r in enumerate(rs) if r.mode == "random"]
        groups: dict[str, list[int]] = {}
        for j, r in enumerate(rs):
            if r.kind == "head" and r.mode != "off" and r.adapter:
                groups.setdefault(r.adapter, []).append(j)
        heads = []
        for path, js in groups.items():
            ks = [rs[j].top_k for j in js]
            k = max(ks)
            keep = None
            if len(set(ks)) > 1:
                keep = torch.arange(k, device=device) < torch.tensor(ks, device=device)[:, None]  # (n, k)
            heads.append(_HeadGroup(path, torch.tensor(js, device=device), k, keep, len(js) == len(rs)))
        return cls(rs, torch.tensor(order, device=device), torch.tensor(taus, dtype=torch.float32, device=device),
                   heads, any(r.trace for r in rs), order == list(range(len(order))), random,
                   torch.tensor(random, dtype=torch.long, device=device))


def _unembed_rows(lm_head, cand: torch.Tensor) -> torch.Tensor:
    """W_U[cand] in fp32 for a (possibly vocab-parallel) lm_head. cand (n, k) -> (n, k, d)."""
    weight = lm_head.weight
    if getattr(lm_head, "tp_size", 1) == 1:
        return weight[cand].float()
    from vllm.distributed import tensor_model_parallel_all_reduce

    start = lm_head.shard_indices.org_vocab_start_index
    end = lm_head.shard_indices.org_vocab_end_index
    local = (cand >= start) & (cand < end)
    rows = weight[(cand - start).clamp(0, weight.shape[0] - 1)].float() * local[..., None]
    return tensor_model_parallel_all_reduce(rows)


def _is_reporting_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, RuntimeError):  # parallel state not initialised: a single process
        return True


def _event_if_cuda(t: torch.Tensor):
    if t.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


__all__ += ["XARGS_KEY"]
