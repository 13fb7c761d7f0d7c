"""Server settings: flags of `reasonmaxxer serve` and `REASONMAXXER_*` environment variables.

Contract: every field has a default that serves the default model with its bundled adapter on
127.0.0.1:8000; an environment variable `REASONMAXXER_<FIELD>` sets a field, a command-line flag
overrides it. Limits bound what one request may ask for (over a limit: HTTP 400 saying which).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REASONMAXXER_", extra="ignore")

    model: str = Field(default="smollm2-135m-instruct", description="known name, local folder or hub id")
    served_name: str | None = Field(default=None, description="model id clients use (default: --model)")
    adapters: list[str] = Field(default_factory=list, description="adapter directories to load at start")
    bundled_adapter: bool = Field(default=True, description="load the model's bundled adapter when none given")
    teachers: list[str] = Field(default_factory=list, description="teacher models (known name or folder) to load "
                                "at start, each named after its folder; transformers backend only")
    teacher_tau: float = Field(default=1.4, ge=0, description="a teacher's default entropy gate in nats (the paper's "
                               "1.4); requests override it with steering.threshold")
    teacher_rate: float | None = Field(default=None, ge=0, le=1, description="a teacher's default fire probability "
                                       "for mode random (none: requests must pass steering.rate)")
    adapter_roots: list[str] = Field(default_factory=list, description="POST /v1/adapters loads only under these "
                                     "directories; none: adapter admin is off")
    max_body_bytes: int = Field(default=4 << 20, ge=1024, description="largest request body (bytes) before 413")
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = Field(default=None, description="require `Authorization: Bearer KEY`")
    metrics_open: bool = Field(default=True, description="serve /metrics without the API key")
    dtype: str | None = Field(default=None, description="model dtype; none: bfloat16 on a GPU or a CPU with "
                              "native bf16 (AVX-512, AMX), float32 on an AVX2-only CPU (bf16 runs ~3x slower there)")
    device: str = Field(default="auto", description="torch device: auto (a GPU where torch sees one, else the CPU)")
    backend: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="transformers (embedded engine) or vllm (needs vLLM: deploy/install-vllm-cpu.sh on a CPU)")
    max_batch_size: int = Field(default=32, ge=1, description="requests decoded together")
    compile: bool = Field(default=False,
                          description="transformers backend: decode steps through torch.compile (compiled at start)")
    max_waiting: int = Field(default=256, ge=1, description="queued sequences before 503 (a request of more: 400)")
    max_tokens_limit: int = Field(default=4096, ge=1, description="largest max_tokens a request may ask")
    max_n: int = Field(default=16, ge=1)
    max_top_logprobs: int = Field(default=20, ge=0)
    max_stop: int = Field(default=16, ge=0)
    drain_timeout_s: float = Field(default=30.0, ge=0, description="SIGTERM: wait this long for requests")
    # vLLM engine arguments (backend vllm only), passed through to vllm.AsyncEngineArgs.
    tensor_parallel_size: int = Field(default=1, ge=1, description="vllm: GPUs to shard the model over")
    max_model_len: int | None = Field(default=None, ge=16, description="vllm: context length (default: model's)")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="vllm: GPU memory share")
    kv_cache_gb: float | None = Field(default=None, gt=0, description="vllm: KV cache GiB (on CPU too)")
    enforce_eager: bool = Field(default=False, description="vllm: no graph compilation (faster start)")
    vllm_lora_rank: int | None = Field(default=None, ge=1, description="vllm: enable LoRA up to this rank")
    vllm_args: dict[str, Any] = Field(default_factory=dict, description="vllm: more engine arguments (JSON)")
