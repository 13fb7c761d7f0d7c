"""Keep the CPU's large temporaries out of fresh pages: glibc malloc settings for a decode loop.

Contract: `tune_malloc()` (Linux with glibc; a no-op returning False elsewhere) raises glibc's mmap
threshold to its maximum (32 MiB), sets its trim threshold to 256 MiB and caps the arenas at 2, for the whole
process. Each decode step allocates and frees tensors of a few MiB to tens of MiB (the (B, V) float32 logits
and their entropy and sampling temporaries: 6 MiB for 32 rows of SmolLM2, 19 MiB for Qwen's 152k vocabulary).
With glibc's defaults such blocks are often mmapped and unmapped on every step, and every new page is a page
fault: measured on an AMD EPYC, 4,500 faults and 6.4 ms for one entropy of a (32, 49152) tensor, 1.1 ms with
these settings. With them, freed memory stays in the process for the next step (as with tcmalloc, which
vLLM's CPU backend preloads), and what it keeps is bounded: an arena returns free memory above 256 MiB at its
top, and a server's threads (the engine's, the event loop's, tokenizer workers) share two arenas instead of
taking one each. Under a 32-client soak of the default server (SmolLM2; `bench/heap_probe.py`), a 1 GiB trim
threshold with an arena per thread held 1.3 GB of free heap beside 1.1 GB in use after 10 minutes; these
settings hold 0.7 GB (docs/server.md, "Memory under load"). Idempotent; settings can be inspected in
`SETTINGS`. A process-wide setting is the process owner's call, never an engine's: the `reasonmaxxer` command
applies it at start (every subcommand) and so do the bench scripts; a program that embeds an `Engine`
decides for itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["SETTINGS", "tune_malloc"]

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 256 << 20, M_TOP_PAD: 64 << 20, M_ARENA_MAX: 2}


def tune_malloc() -> bool:
    """Apply SETTINGS through mallopt. Returns whether glibc took them all."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(key, value) == 1 for key, value in SETTINGS.items())
