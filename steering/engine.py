"""The transformers decode engine: continuous batching with per-row sampling and gated correction.

One `Engine.step()` runs one decode forward for the running rows, prefills the requests admitted at
this step boundary (left-padded, then merged into the running batch), and for every row: computes the
base logits from the final hidden state, the entropy gate, the correction where it applies, and samples
one token. It returns the `TokenEvent`s produced. `submit` and `cancel` may be called from other threads.

Per row, with h the final hidden state at the current position and `logits = W_U h` (float32):
- mode `off`: the base distribution; the gate never fires.
- mode `gated`: fires where H(softmax(logits)) > threshold; mode `always`: fires at every token; mode
  `random` (the control): fires where a coin keyed by the request's seed and the position comes up,
  with probability `rate`, whatever the entropy.
- `head` adapter, where fired: logits[c] += scale * W_U[c] (B A h) on the base top-k candidates c.
  No extra forward pass; the KV cache is the base model's.
- `lora` adapter, mode `always`: the row runs with the LoRA applied in every forward, prefill
  included; its KV cache is the adapted model's (exactly PEFT's model with the adapter on).
- a `Teacher` (teacher.py), where fired: the logits are the teacher's, restricted to the base top-k
  candidates (k = 0: all), from the row's lazy teacher cache (one teacher forward per fire, over the
  tokens it has not seen). The row's own KV cache stays the base model's.
- `lora` adapter, mode `gated`: the row runs the base model, so its KV cache holds base keys and
  values at every position, fired or not. Where the gate fires, only the current position is
  recomputed with the LoRA on: its query, key and value come from the adapted layers, it attends to
  the base cache of all earlier positions plus its own adapted key/value, and its logits replace the
  base logits for sampling. That recomputation's key/value is then discarded: nothing adapted ever
  enters the cache. So gated LoRA changes which token is chosen at fired positions and nothing else,
  as the `head` adapter does; it is not the adapted model's distribution on an adapted prefix. The
  trace's entropy and base token are the base model's. (With `always`, no base pass runs, so the
  trace's entropy is the adapted model's.)
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from typing import Any

import torch
from torch.profiler import record_function

from . import packed
from .adapters import HeadAdapter, LoraAdapter
from .attention import plain_attention, use_decode_attention
from .batch import Batch, prefill_groups
from .compiled import CompiledDecoder
from .corrections import Correction, correction_of
from .fused import FusedDecoder
from .gate import entropy, gate_mask, random_fire
from .lora import LoraRouter
from .manifest import base_identity
from .own import own_view
from .packed import pack_linears, unpack_linears
from .prompt_logprobs import PromptLogprobs, score_pieces, score_prompts
from .request import Completion, Request, SteeringParams, TokenEvent, UnknownAdapter
from .rows import Row
from .sampling import SamplingParams, sample
from .teacher import Teacher

__all__ = ["STEPS", "Engine"]

STEPS = ("reference", "module", "fused", "compiled")  # the decode paths (Engine.__init__)

_UNSUPPORTED_CONFIG = ("final_logit_softcapping", "logits_scaling", "logit_scale")


class Engine:
    """Decode many requests together on one transformers causal LM."""

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 32, name: str | None = None,
                 step: str = "fused"):
        """`step` names the decode path, the one speed switch (STEPS; every path gives the same values up to float
        rounding, and every identity holds on each):
        - "reference": transformers' forward with plain F.linear and its sdpa attention (the numerics the recipe's
          tests and published rollouts use);
        - "module": transformers' forward, with the linears on oneDNN-prepacked weights on the CPU (packed.py)
          and decode attention by grouped matmuls (attention.py);
        - "fused" (default): "module" where for Llama-family models prefills, decode steps and gated-LoRA
          recomputes run through fused.py's FusedDecoder (the same arithmetic without transformers' module
          machinery, q/k/v and gate/up one matmul each); other models run the "module" step;
        - "compiled": "fused" with decode steps through torch.compile (compiled.py): for Llama-family models the
          fused step's arithmetic with the weights frozen (inductor packs the linears and fuses the elementwise
          work between them); other models: "module" with transformers' decoder compiled.
        All of it lives on the engine's own view of the model (own.py): the caller's model is left as it was.
        Process-wide settings are the process owner's: the `reasonmaxxer` command tunes glibc malloc at start
        (allocator.py)."""
        if step not in STEPS:
            raise ValueError(f"engine step {step!r} is unknown: use one of {', '.join(STEPS)}")
        for key in _UNSUPPORTED_CONFIG:
            if getattr(model.config, key, None) not in (None, 1.0):
                raise ValueError(f"models with {key} are not supported: their logits are not W_U h")
        layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in layer_types):
            raise ValueError("only full-attention models are supported (no sliding-window layers)")
        model = own_view(model)  # everything below changes the engine's view, never the caller's model
        self.model, self.tokenizer = model.eval(), tokenizer
        self.step_name = step
        self.fast = step != "reference"  # the fast kernels (packed linears, grouped decode attention)
        self.packed = pack_linears(model) if self.fast else 0
        self.grouped_attention = use_decode_attention(model) if self.fast else False
        if not self.fast:
            unpack_linears(model)
            plain_attention(model)
        self.lora = LoraRouter(model)
        self.fused = FusedDecoder.of(model, self.lora) if step in ("fused", "compiled") else None
        self.compiled = CompiledDecoder(model, self.fused) if step == "compiled" else None
        self.max_batch_size = max_batch_size
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.identity = base_identity(model, tokenizer, name)
        self.lm_head = model.get_output_embeddings()
        self.vocab = int(model.get_input_embeddings().num_embeddings)
        self.adapters: dict[str, HeadAdapter | LoraAdapter | Teacher] = {}  # one namespace: teachers too
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        self._lock = threading.Lock()
        self._waiting: deque[Row] = deque()
        self._cancelled: set[str] = set()
        self._retired: dict[str, Correction] = {}  # removed, released when no request uses them
        self._rows: list[Row] = []
        self._batch: Batch | None = None

    def describe(self) -> dict[str, Any]:
        """What this engine runs on: device, dtype, the decode step (STEPS, and how it runs) and on the CPU which
        linear kernels (for a banner)."""
        kernels = None
        if self.model.device.type == "cpu":
            kernels = (f"{self.packed} linears on oneDNN-packed weights, {packed.layout(self.model.dtype).describe()}"
                       if self.packed else
                       "linears on F.linear (oneDNN cannot pack this dtype here, or the reference step)")
        step = self.step_name
        if self.compiled is not None:
            step += (" (torch.compile of the fused step, weights frozen: inductor packs its linears)"
                     if self.compiled.fused is not None else " (torch.compile of transformers' decoder)")
        return {"device": str(self.model.device), "dtype": str(self.model.dtype).removeprefix("torch."),
                "kernels": kernels, "step": step}

    # ---- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, adapter: HeadAdapter | LoraAdapter | Teacher) -> None:
        """Validate against this model and register under `adapter.name` (AdapterError if unfit), prepared for this
        engine by its kind's `Correction` (corrections.py: a head's weights on the model's device, moved once; a
        teacher's own fast view). Teachers register the same way, by name (their vocabulary must be this model's)."""
        adapter.validate(self.model, self.tokenizer)
        correction = correction_of(adapter)
        adapter = correction.prepare(self, adapter)
        with self._lock:
            if adapter.name in self.adapters:
                raise ValueError(f"an adapter named {adapter.name!r} is already loaded: remove it first")
            correction.attach(self, adapter)
            self.adapters[adapter.name] = adapter

    def remove_adapter(self, name: str) -> None:
        """Unregister now; requests already using it finish with it, then its weights are released."""
        with self._lock:
            if name not in self.adapters:
                raise KeyError(f"no adapter named {name!r} is loaded")
            self._retired[name] = correction_of(self.adapters.pop(name))
        self._release_retired()

    # ---- requests ------------------------------------------------------------------------------------
    def submit(self, request: Request) -> str:
        """Queue a request; it joins the running batch at the next step. ValueError if it cannot run."""
        n = len(request.prompt_ids)
        self._check_prompt(request.prompt_ids)
        if n + request.sampling.max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({n} tokens) plus max_tokens ({request.sampling.max_tokens}) exceeds the model's "
                f"context of {self.max_model_len} tokens: shorten the prompt or lower max_tokens"
            )
        with self._lock:
            self._waiting.append(Row(request, self._adapter_for(request.steering), self.tokenizer))
        return request.request_id

    def _adapter_for(self, steering: SteeringParams) -> HeadAdapter | LoraAdapter | Teacher | None:
        """The registered adapter a request names (None for a plain one); ValueError if it is not loaded."""
        if steering.mode == "off" and not steering.adapter:
            return None
        adapter = self.adapters.get(steering.adapter or "")
        if adapter is None:
            raise UnknownAdapter(steering.adapter, self.adapters)
        return adapter

    def _check_prompt(self, ids: list[int]) -> None:
        """A prompt holds at least one token, and only ids of this model's vocabulary."""
        if not ids:
            raise ValueError("the prompt is empty: send at least one token")
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is out of range: this model's token ids are 0 to {self.vocab - 1}")

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step boundary; its last event has finish_reason 'cancelled'."""
        with self._lock:
            self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- the step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Advance every running request by one token and admit waiting ones. Returns the events."""
        events = self._take_cancellations()
        self._evict_finished()
        if self._batch is not None:
            with self.lora.route(self._lora_routes(self._rows)), record_function("engine.decode"):
                hidden = self._batch.decode(self.model, self.compiled or self.fused)  # (B, d)
            events += self._advance(self._rows, self._batch, hidden)
        new = self._admit()
        if new:
            with record_function("engine.join"):
                events += self._join(new)
        self._evict_finished()
        return events

    def _join(self, new: list[Row]) -> list[TokenEvent]:
        """Prefill `new` rows and merge them into the running batch: all at once through the fused step, which
        packs prompts without padding; else in groups of similar prompt length (`prefill_groups`: left padding
        is compute spent on nothing)."""
        if self._fused_prefill(new):
            return self._join_group(new)
        groups = prefill_groups([len(r.request.prompt_ids) for r in new])
        return [event for group in groups for event in self._join_group([new[i] for i in group])]

    def _fused_prefill(self, rows: list[Row]) -> bool:
        """Whether `rows` prefill through the fused step: a fused decoder, and no LoRA on every forward (its
        routes are per row, the packed prefill's rows are tokens)."""
        return self.fused is not None and not any(r.every_forward for r in rows)

    def _join_group(self, new: list[Row]) -> list[TokenEvent]:
        """Prefill `new` rows as one batch and merge them in. If their batch fails, each row is tried alone, so
        one request that cannot run ends alone, with finish_reason "error" (defence in depth: the server
        validates what it can first), and the running rows never see it."""
        try:
            with self.lora.route(self._lora_routes(new)):
                batch, hidden = Batch.prefill(self.model, [r.request.prompt_ids for r in new], self.pad_id,
                                              fused=self.fused if self._fused_prefill(new) else None)
            events = self._advance(new, batch, hidden)
        except Exception as e:
            if len(new) == 1:
                return [new[0].fail(f"{type(e).__name__}: {e}")]
            return [event for row in new for event in self._join_group([row])]
        if self._batch is None:
            self._batch = batch
        else:
            self._batch.merge(batch)
        self._rows = self._rows + new
        return events

    def _advance(self, rows: list[Row], batch: Batch, hidden: torch.Tensor) -> list[TokenEvent]:
        """Logits, gate, correction and one token per row; the step's one device->host transfer is at the end
        (plus, where a fired row needs a second model (gated LoRA, a teacher), the fired mask before it)."""
        with record_function("engine.lm_head"):
            logits = self.lm_head(hidden).float()  # (B, V) base (adapted for lora-always rows)
        with record_function("engine.gate"):
            # (B,): only where a row reads it (its pass over the vocabulary is ~2% of a 32-row step of SmolLM2)
            h = entropy(logits) if any(r.reads_entropy for r in rows) else logits.new_zeros(len(rows))
            fired = self._fired(rows, h)  # (B,) bool
            base_top = logits.argmax(dim=-1)  # (B,)
        with record_function("engine.steer"):
            steered = self._steer(rows, batch, hidden, logits, fired)
        with record_function("engine.sample"):
            params, draws = [r.params for r in rows], [r.draw for r in rows]
            tokens = sample(steered, params, draws, argmax=base_top if steered is logits else None)  # (B,)
        batch.tokens = tokens
        with record_function("engine.record"):
            host = torch.stack([tokens.double(), base_top.double(), fired.double(), h.double()]).tolist()  # (4, B)
            return self._record(rows, *host, logits, steered)

    def _fired(self, rows: list[Row], h: torch.Tensor) -> torch.Tensor:
        """The gate of every row, on the device: H > tau (tau folds the mode in), or for a row in mode random
        the seeded coin of its position instead (computed on the host, where the request's key lives)."""
        tau = torch.tensor([r.steering.gate_tau for r in rows], device=h.device)  # (B,)
        fired = gate_mask(h, tau)
        coins = [(i, random_fire(r.request.gate_key, len(r.token_ids), r.steering.random_rate))
                 for i, r in enumerate(rows) if r.steering.random_rate is not None]
        if coins:
            idx = torch.tensor([i for i, _ in coins], device=h.device)
            fired[idx] = torch.tensor([c for _, c in coins], device=h.device)
        return fired

    def _record(self, rows, tokens, base_top, fired, h, logits, steered) -> list[TokenEvent]:
        return [
            r.record(int(tok), ent, bool(f), int(top), logits[i], steered[i], self.eos_ids, self.max_model_len)
            for i, (r, tok, ent, f, top) in enumerate(zip(rows, tokens, h, fired, base_top, strict=True))
        ]

    def _steer(self, rows, batch: Batch, hidden, logits: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
        """Apply each fired row's correction, through its kind's `Correction` (corrections.py). Returns `logits`
        itself when no row has a correction to apply. Sources that run a model (gated LoRA, teachers) need to know
        which rows fired first: one transfer of the fired mask, then their fired rows only."""
        kinds: dict[Correction, list[int]] = {}
        for i, row in enumerate(rows):
            st = row.steering
            if row.adapter is None or row.every_forward or (st.gate_tau == math.inf and st.random_rate is None):
                continue
            kinds.setdefault(row.correction, []).append(i)
        out = logits
        for correction, idx in kinds.items():
            if not correction.runs_model:
                out = correction.steer(self, rows, idx, batch, hidden, logits, fired, out)
        second = [i for c, idx in kinds.items() if c.runs_model for i in idx]
        if second:
            on = dict(zip(second, fired[second].tolist(), strict=True))
            for correction, idx in kinds.items():
                if correction.runs_model and (hit := [i for i in idx if on[i]]):
                    out = correction.steer(self, rows, hit, batch, hidden, logits, fired, out)
        return out

    def _lora_routes(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """The router's routes for the rows whose LoRA runs in every forward."""
        return self.routes([r.adapter.name if r.every_forward else None for r in rows])

    def routes(self, names: list[str | None]) -> dict[str, torch.Tensor]:
        """{adapter: batch rows} for per-row LoRA names (None: no LoRA on that row)."""
        routes: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name is not None:
                routes.setdefault(name, []).append(i)
        return {k: torch.tensor(v, device=self.model.device) for k, v in routes.items()}

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def _admit(self) -> list[Row]:
        with self._lock:
            room = self.max_batch_size - len(self._rows)
            return [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]

    def _take_cancellations(self) -> list[TokenEvent]:
        with self._lock:
            ids, self._cancelled = self._cancelled, set()
            events = [r.cancel() for r in self._waiting if r.request_id in ids]
            self._waiting = deque(r for r in self._waiting if r.request_id not in ids)
        events += [r.cancel() for r in self._rows if r.request_id in ids and not r.finished]
        return events

    @record_function("engine.evict")
    def _evict_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.finished]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        else:
            self._batch.select(torch.tensor(keep, device=self.model.device))
            self._batch.trim()
        self._release_retired()

    def _release_retired(self) -> None:
        with self._lock:
            in_use = {r.adapter.name for r in [*self._rows, *self._waiting] if r.adapter is not None}
            for name in [n for n in self._retired if n not in in_use]:
                self._retired.pop(name).detach(self, name)

    # ---- prompt logprobs (echo) ---------------------------------------------------------------------------
    def prompt_logprobs(self, prompts: list[list[int]], steering: SteeringParams, top_n: int = 0,
                        key: int = 0) -> list[PromptLogprobs]:
        """Logprobs of every prompt token under `steering`, from one prefill per prompt (prompt_logprobs.py).
        Call it from the thread that steps the engine (the LoRA router is shared); ValueError if it cannot run."""
        self._check_scoring(prompts)
        return score_prompts(self, prompts, self._adapter_for(steering), steering, top_n, key)

    def prompt_logprobs_pieces(self, prompts: list[list[int]], steering: SteeringParams, top_n: int = 0,
                               key: int = 0) -> Generator[None, None, list[PromptLogprobs]]:
        """`prompt_logprobs` as a generator of pieces (CHUNK prompt positions prefilled and scored per `next`) that
        returns the list: the arguments are checked before the first piece (ValueError)."""
        self._check_scoring(prompts)
        return score_pieces(self, prompts, self._adapter_for(steering), steering, top_n, key)

    def _check_scoring(self, prompts: list[list[int]]) -> None:
        for ids in prompts:
            self._check_prompt(ids)
            if len(ids) > self.max_model_len:
                raise ValueError(f"the prompt ({len(ids)} tokens) exceeds the model's context of "
                                 f"{self.max_model_len} tokens: shorten it")

    # ---- conveniences ----------------------------------------------------------------------------------
    def iter_events(self, requests: Iterable[Request]) -> Iterator[TokenEvent]:
        """Submit `requests` and yield every event the engine produces (theirs and any other running
        request's) as it is produced, until all of `requests` have finished."""
        pending = {self.submit(r) for r in requests}
        while pending:
            for event in self.step():
                if event.finished:
                    pending.discard(event.request_id)
                yield event

    def warm_up(self) -> None:
        """Compile the compiled step's graphs now (batch size 1 and any larger: compiled.py), so that no request
        waits for them (a minute or more for a real model on one core); nothing for the eager steps."""
        if self.compiled is None:
            return
        sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        prompt = [self.pad_id] * 4
        self.generate([Request(prompt, sp), Request(prompt, sp)])
        self.generate([Request(prompt, sp)])

    def generate(self, requests: Iterable[Request]) -> list[Completion]:
        """Run `requests` to completion (beside whatever else is running); results in the order given."""
        requests = list(requests)
        parts: dict[str, list[TokenEvent]] = {r.request_id: [] for r in requests}
        for event in self.iter_events(requests):
            if event.request_id in parts:
                parts[event.request_id].append(event)
        return [_completion(rid, evs) for rid, evs in parts.items()]


def _completion(request_id: str, events: list[TokenEvent]) -> Completion:
    tokens = [e.token_id for e in events if e.token_id is not None]
    return Completion(
        request_id=request_id, token_ids=tokens, text="".join(e.text for e in events),
        finish_reason=events[-1].finish_reason, report=events[-1].report,
        logprobs=[e.logprob for e in events if e.logprob is not None],
    )


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return frozenset(ids)
