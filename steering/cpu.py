"""The CPU this process runs on, named as benchmarks and the server banner name it: bf16 kernels (oneDNN's packed
linears, AMX tiles) and their speed differ by CPU class, so a figure or a start-up line says which class it met.

Contract: `isa_class(flags)` is the best class the /proc/cpuinfo flags name ("AMX", "AVX-512-BF16", "AVX-512",
"AVX2", else "other"; the same order as .ci/run's); `describe()` returns {"cpu": model name, "isa": class,
"cores": logical CPUs this process may run on, "threads": torch's intra-op threads, "gpu": the CUDA device's name
or None}. Linux reads /proc/cpuinfo; elsewhere the platform's processor string stands in and the class is
"other".
"""

from __future__ import annotations

import os
import platform

__all__ = ["ISA_CLASSES", "describe", "isa_class"]

ISA_CLASSES = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def isa_class(flags: set[str]) -> str:
    return next((name for flag, name in ISA_CLASSES if flag in flags), "other")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def describe() -> dict:
    import torch

    model, flags = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": model, "isa": isa_class(flags), "cores": cores, "threads": torch.get_num_threads(), "gpu": gpu}
