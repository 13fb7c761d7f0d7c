"""`VllmOfflineEngine`: vLLM's synchronous `LLMEngine` behind the `submit` / `step` interface of our decode
`Engine`, so `training/rollouts.py` (rollouts, evaluation) runs on vLLM unchanged.

Contract: `start(model_path, tokenizer, engine_args)` starts vLLM with the reasonmaxxer logits processor
and a gate collector; `submit(request)` queues a request (steering as on the server: `head` adapters
gated or always, `lora` always); `step()` runs one engine step and returns the `TokenEvent`s it made, the
last event of a request carrying its exact gate report. Sampling seeds are vLLM's: the same seed gives
the same sample on vLLM, but not the sample the transformers engine draws.
"""

from __future__ import annotations

from typing import Any

from reasonmaxxer.steering.request import Request, TokenEvent

from .engine import VllmSteering, events_of, prepare_start, to_vllm_params
from .reports import GateCollector

__all__ = ["VllmOfflineEngine"]


class VllmOfflineEngine(VllmSteering):
    def __init__(self, engine, tokenizer, collector: GateCollector, identity, lora_rank: int | None, name: str):
        super().__init__(tokenizer, collector, lora_rank, identity, int(engine.model_config.max_model_len))
        self.engine, self.name = engine, name
        self._reports: dict[str, tuple[Any, list[int], int | None]] = {}

    @classmethod
    def start(cls, model_path: str, tokenizer, extra_args: dict[str, Any] | None = None, name: str | None = None,
              lora_rank: int | None = None) -> VllmOfflineEngine:
        collector, kwargs, identity = prepare_start(model_path, tokenizer, extra_args, lora_rank, name)
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_engine_args(EngineArgs(**kwargs))
        return cls(engine, tokenizer, collector, identity, lora_rank, name or model_path)

    @property
    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def submit(self, request: Request) -> str:
        self.check(request)
        report, xargs, lora = self._steering(request)
        rid = request.request_id
        self.engine.add_request(rid, {"prompt_token_ids": list(request.prompt_ids)}, to_vllm_params(request, xargs),
                                lora_request=lora)
        self._reports[rid] = (report, [], request.sampling.logprobs)
        return rid

    def cancel(self, request_id: str) -> None:
        if self._reports.pop(request_id, None) is not None:
            self.engine.abort_request([request_id])
            self.collector.discard(request_id)

    def step(self) -> list[TokenEvent]:
        events: list[TokenEvent] = []
        for out in self.engine.step():
            rid = out.request_id
            if rid not in self._reports:
                continue
            report, token_ids, n_logprobs = self._reports[rid]
            token_ids += out.outputs[0].token_ids
            if out.finished:
                del self._reports[rid]
                self._report(rid, report, token_ids)
            events.extend(events_of(rid, out, report, n_logprobs))
        return events

    def close(self) -> None:
        for rid in list(self._reports):
            self.cancel(rid)
        self._release()
