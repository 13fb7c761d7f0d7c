"""Exact per-request gate reports from inside vLLM's workers back to the process that asked.

Mechanism: a ZeroMQ PUSH -> PULL side channel. The serving process binds a `GateCollector` on a private
ipc:// address and exports it as `REASONMAXXER_GATE_ADDR` before vLLM spawns its engine; every worker's
logits processor (TP rank 0 only) sends, each step, one record per steered row: (request id, position,
entropy, fired, base argmax). A record is keyed by (request id, position), where the position is the
number of tokens the request had already generated when the row was sampled, so a step whose sample
vLLM throws away (a partial prefill chunk) or repeats (recompute after preemption) overwrites the same
key instead of adding one: reports stay exact under chunked prefill, preemption and concurrency.

`GateCollector.take(request_id, n_tokens)` waits until positions 0..n-1 have all arrived (the channel
is separate from vLLM's output path, so records may land a moment after the final output) and returns
them in order. `ReportSender` does the worker side on a background thread, so the decode step never
waits for a device->host copy or a socket.

On vLLM's own OpenAI server (no collector: stock serving stacks run `vllm serve`), the same thread counts
the gate in Prometheus form instead: `reasonmaxxer_generated_tokens_total` and
`reasonmaxxer_gate_fired_tokens_total` by model, adapter (its registered name) and mode, the names and
labels our server exports. vLLM's server keeps its metrics in prometheus_client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, which its worker processes inherit), so counters incremented in a worker are
served on its `/metrics`. A sample vLLM discards (a partial prefill chunk) counts there too: those counters
are sampled rows, the collector's reports are exact tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

__all__ = ["ENV_ADDR", "GateCollector", "GateRecord", "ReportSender"]

ENV_ADDR = "REASONMAXXER_GATE_ADDR"


@dataclass(frozen=True)
class GateRecord:
    position: int
    entropy: float
    fired: bool
    base_token: int | None


class GateCollector:
    """Server side: binds a PULL socket and gathers records per request id (thread-safe)."""

    def __init__(self, address: str | None = None):
        import zmq

        if address is None:
            folder = tempfile.mkdtemp(prefix="reasonmaxxer-gate-")  # 0700: only this user can connect
            address = f"ipc://{folder}/{uuid.uuid4().hex[:8]}.sock"
        self.address = address
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.bind(address)
        self._records: dict[str, dict[int, GateRecord]] = {}
        self.received = 0  # records received in all (a duplicate would count twice: tensor-parallel ranks send none)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="reasonmaxxer-gate-collector", daemon=True)
        self._thread.start()

    def export(self) -> None:
        """Point workers started from now on (they inherit the environment) at this collector."""
        os.environ[ENV_ADDR] = self.address

    def _run(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._closed:
            if not poller.poll(200):
                continue
            batch = json.loads(self._sock.recv())
            with self._cond:
                for rid, pos, ent, fired, base in batch:
                    self._records.setdefault(rid, {})[pos] = GateRecord(pos, ent, bool(fired), base)
                self.received += len(batch)
                self._cond.notify_all()

    def take(self, request_id: str, n_tokens: int, timeout: float = 30.0) -> list[GateRecord]:
        """The records of positions 0..n_tokens-1 of `request_id`, removing them; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = self._records.get(request_id, {})
                if all(p in got for p in range(n_tokens)):
                    self._records.pop(request_id, None)
                    return [got[p] for p in range(n_tokens)]
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [p for p in range(n_tokens) if p not in got]
                    self._records.pop(request_id, None)
                    raise TimeoutError(
                        f"gate records of request {request_id} never arrived for positions {missing[:8]}: is the "
                        "reasonmaxxer logits processor loaded in the vLLM engine (logits_processors)?"
                    )
                self._cond.wait(left)

    def discard(self, request_id: str) -> None:
        with self._cond:
            self._records.pop(request_id, None)

    def close(self) -> None:
        self._closed = True
        self._thread.join(1.0)
        self._sock.close(linger=0)
        if self.address.startswith("ipc://"):
            path = self.address[len("ipc://"):]
            for p in (path, os.path.dirname(path)):
                with contextlib.suppress(OSError):
                    os.rmdir(p) if os.path.isdir(p) else os.unlink(p)


class ReportSender:
    """Worker side: turns each step's tensors into records off the hot path and pushes them."""

    def __init__(self, address: str | None, model: str = "", metrics: bool = False):
        self.address, self.model, self.metrics = address, model, metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="reasonmaxxer-gate-sender", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, model: str = "") -> ReportSender | None:
        """To the collector whose address this process inherited; else, under vLLM's own server (multiprocess
        Prometheus), counting into its /metrics; else None (nothing to do)."""
        address = os.environ.get(ENV_ADDR)
        if address:
            return cls(address, model)
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return cls(None, model, metrics=True)
        return None

    def put(self, meta: list[tuple[str, int, str, str]], entropy, fired, base_token, event=None) -> None:
        """meta: (request id, position, adapter name, mode) per row; entropy (n,) fired (n,) base_token (n,) or
        None, on any device; `event` (a CUDA event recorded after they were computed) is waited on off the hot
        path."""
        self._queue.put((meta, entropy, fired, base_token, event))

    def _run(self) -> None:
        sock = counters = None
        if self.address:
            import zmq

            sock = zmq.Context.instance().socket(zmq.PUSH)
            sock.connect(self.address)
        if self.metrics:
            from prometheus_client import Counter

            labels = ("model", "adapter", "mode")
            counters = (Counter("reasonmaxxer_generated_tokens", "Tokens generated (sampled rows)", labels),
                        Counter("reasonmaxxer_gate_fired_tokens", "Tokens where the adapter was applied", labels))
        while True:
            meta, ent, fired, base, event = self._queue.get()
            if event is not None:
                event.synchronize()
            ents, fires = ent.tolist(), fired.tolist()
            bases = base.tolist() if base is not None else [None] * len(meta)
            if sock is not None:
                rows = [[m[0], m[1], e, f, b] for m, e, f, b in zip(meta, ents, fires, bases, strict=True)]
                sock.send(json.dumps(rows).encode())
            if counters is not None:
                for (_, _, adapter, mode), f in zip(meta, fires, strict=True):
                    counters[0].labels(self.model, adapter, mode).inc()
                    if f:
                        counters[1].labels(self.model, adapter, mode).inc()
