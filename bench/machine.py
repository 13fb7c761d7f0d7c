"""The machine a figure came from, for every benchmark's header and JSON: bf16 kernels and their speed differ by
CPU class, so a figure without its CPU is no figure.

Contract: `describe()` returns {"cpu": model name, "isa": "AMX" | "AVX-512-BF16" | "AVX-512" | "AVX2" | "other",
"cores": logical CPUs this process may run on, "threads": torch's intra-op threads, "gpu": the CUDA device's
name or None}; `header(d)` is its one-line form. Linux reads /proc/cpuinfo; elsewhere the platform's processor
string stands in and the ISA class is "other".
"""

from __future__ import annotations

import os
import platform

__all__ = ["ISA_CLASSES", "describe", "header", "isa_class"]

# The first flag present names the class (the same order as .ci/run's).
ISA_CLASSES = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def isa_class(flags: set[str]) -> str:
    return next((name for flag, name in ISA_CLASSES if flag in flags), "other")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.processor() or platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def describe() -> dict:
    import torch

    model, flags = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "isa": isa_class(flags), "cores": cores, "threads": torch.get_num_threads(), "gpu": gpu}


def header(d: dict) -> str:
    gpu = f", GPU {d['gpu']}" if d.get("gpu") else ""
    return f"machine: {d['cpu']} ({d['isa']}), {d['cores']} cores, {d['threads']} torch threads{gpu}"
