"""Where a server's memory goes: runs `reasonmaxxer ARGS...` (e.g. `serve --port 8000`) in this process and
writes glibc's heap statistics every `--every` seconds, so that resident memory that grows under load can be
told apart: heap the allocator holds but nothing uses (`free`: retention and fragmentation, the allocator's
settings' doing) from memory still in use (`inuse`: a leak, or caches filling).

    python bench/heap_probe.py --out heap.tsv [--every 30] [--trace] -- serve --port 8000

Each line: seconds, RSS, heap (the arenas' size), inuse, free (inside the arenas), mmap (blocks mapped on
their own), threads, and with `--trace` the memory Python's tracemalloc sees plus, after the first minute, the
five allocation sites that grew most since then (tracemalloc slows the server: use it to find, not to time).
Pair it with `bench/soak.py --pid` for the load. glibc only (mallinfo2, glibc 2.33+).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
import tracemalloc

from soak import rss_mb


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]


def watch(out, every: float, trace: bool) -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    mb = 1 << 20
    start, first = time.monotonic(), None
    print("s\trss_mb\theap_mb\tinuse_mb\tfree_mb\tmmap_mb\tthreads\tpython_mb", file=out, flush=True)
    while True:
        m = libc.mallinfo2()
        python = tracemalloc.get_traced_memory()[0] / mb if trace else float("nan")
        print(f"{time.monotonic() - start:.0f}\t{rss_mb(os.getpid()):.0f}\t{m.arena / mb:.0f}\t{m.uordblks / mb:.0f}\t"
              f"{m.fordblks / mb:.0f}\t{m.hblkhd / mb:.0f}\t{threading.active_count()}\t{python:.0f}", file=out,
              flush=True)
        if trace and time.monotonic() - start > 60:
            snapshot = tracemalloc.take_snapshot()
            if first is None:
                first = snapshot
            else:
                for stat in snapshot.compare_to(first, "traceback")[:5]:
                    print(f"#\t{stat}\t" + " / ".join(str(f) for f in stat.traceback[-3:]), file=out, flush=True)
        time.sleep(every)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the statistics file (tab-separated)")
    p.add_argument("--every", type=float, default=30.0, help="seconds between lines")
    p.add_argument("--trace", action="store_true", help="also trace Python's allocations (slow)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the reasonmaxxer command line")
    a = p.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not args:
        p.error("give the reasonmaxxer command after --, e.g. -- serve --port 8000")
    if a.trace:
        tracemalloc.start(5)
    out = open(a.out, "w")  # noqa: SIM115 (open for the process's life, written by the watcher thread)
    threading.Thread(target=watch, args=(out, a.every, a.trace), daemon=True).start()
    from reasonmaxxer.cli import main as reasonmaxxer

    return reasonmaxxer(args)


if __name__ == "__main__":
    sys.exit(main())
