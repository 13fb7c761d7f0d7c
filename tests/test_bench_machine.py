"""Every benchmark names the machine its figures came from (bench/machine.py over steering/cpu.py): the CPU's
model name, its ISA class, the cores and threads, in the printed header and in the JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import machine  # noqa: E402


@pytest.mark.parametrize("flags, isa", [({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AMX"),
                                        ({"avx2", "avx512f", "avx512_bf16"}, "AVX-512-BF16"),
                                        ({"avx2", "avx512f"}, "AVX-512"), ({"sse4_2", "avx2"}, "AVX2"),
                                        ({"neon"}, "other")])
def test_the_isa_class_is_the_best_the_flags_name(flags, isa):
    assert machine.isa_class(flags) == isa


def test_the_description_is_this_machines():
    d = machine.describe()
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = {line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")}
    if names:
        assert d["cpu"] in names
        flags = next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        assert d["isa"] == machine.isa_class(set(flags))
    assert d["cores"] == len(os.sched_getaffinity(0)) and d["threads"] >= 1
    assert machine.header(d) == f"machine: {d['cpu']} ({d['isa']}), {d['cores']} cores, {d['threads']} torch threads"


@pytest.mark.slow
def test_decode_bench_prints_and_stores_the_machine(tmp_path):
    out = tmp_path / "decode.json"
    run = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--streams", "1", "--new-tokens", "4",
                          "--repeats", "1", "--json", str(out)], capture_output=True, text=True, timeout=600,
                         cwd=BENCH)
    assert run.returncode == 0, run.stderr[-3000:]
    d = json.loads(out.read_text())["machine"]
    assert d == {**machine.describe(), "threads": d["threads"]} and d["cpu"] and d["isa"]
    assert machine.header(d) in run.stdout
