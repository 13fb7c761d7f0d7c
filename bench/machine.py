"""The machine a figure came from, for every benchmark's header and JSON (`describe()`: steering/cpu.py's CPU
model, ISA class, cores, torch threads and GPU); `header(d)` is its one-line form."""

from __future__ import annotations

from reasonmaxxer.steering.cpu import describe, isa_class

__all__ = ["describe", "header", "isa_class"]


def header(d: dict) -> str:
    gpu = f", GPU {d['gpu']}" if d.get("gpu") else ""
    return f"machine: {d['cpu']} ({d['isa']}), {d['cores']} cores, {d['threads']} torch threads{gpu}"
