"""Running the app under uvicorn with the drain users of a load balancer expect.

Contract: `bind(host, port)` takes the port first (ValueError if it cannot: exit 2 before any model loads);
`serve(settings, log_level, say, sock)` builds the server's state (model, engine, adapters) inside
uvicorn's event loop but before uvicorn starts the app, so a configuration error that only shows once the
model is loaded (an adapter for another base) propagates to the caller as its own exception (the CLI: one
line, exit 2) instead of a lifespan traceback; then `say`s the start-up banner (`banner`: model, backend,
dtype, device, each adapter with kind, tau and fire rate, URL, auth) and runs until SIGTERM or SIGINT.
The first signal starts the drain (logged at INFO: its start, what it cut, its end):
new requests get 503 (`shutting_down`) and so does `/health` (`{"status": "draining"}`), running ones go on
for up to `settings.drain_timeout_s` seconds;
whatever still runs then ends with a last event that says the server is shutting down (a stream: an error
event in OpenAI's shape, then `data: [DONE]`; a plain request: a 503), connections close, the engine stops,
and the process exits 0, within the timeout plus a second or two. A second signal (during the drain) ends
every request at once the same way (each stream: the error event, then `data: [DONE]`), stops the engine
after its step in progress, and exits within 2 s with the signal's status (130 for SIGINT, 143 for SIGTERM).
The event loop never waits on the engine thread: the engine is closed from a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import uvicorn

from reasonmaxxer.steering.cpu import describe

from .app import build_state, create_app
from .backends import vllm_engine_args

__all__ = ["DrainingServer", "serve"]

log = logging.getLogger("reasonmaxxer.server")
# The drain's lines go where uvicorn's own go (its configured "uvicorn.error" logger, at --log-level): a logger
# of our own would have no handler under uvicorn's logging config, and say nothing until the drain was over.
drain_log = logging.getLogger("uvicorn.error")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain; `make_app()` (optional) builds the app in the loop before start-up."""

    def __init__(self, config: uvicorn.Config, app, drain_timeout: float, make_app=None):
        super().__init__(config)
        self.app, self.drain_timeout, self.make_app = app, drain_timeout, make_app
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        if self.make_app is not None:
            self.app = self.config.app = self.make_app()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._loop is None or not self.started:
            return super().handle_exit(sig, frame)  # before start-up: uvicorn's exit
        if self._draining:  # the second signal: end everything now; uvicorn re-raises it at exit (130 / 143)
            drain_log.info("second signal: ending every request now and exiting")
            self._loop.call_soon_threadsafe(self._end_now)
            return super().handle_exit(sig, frame)
        self._draining = True  # not recorded as captured: uvicorn would re-raise it at exit (status 143)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.drain()))

    def _end_now(self) -> None:
        """On the event loop: every request ends with its shutting-down event, the engine stops taking work."""
        state = self.app.state.server
        state.draining = True
        state.stop.set()
        state.engine.stop(drain=False)

    async def drain(self) -> None:
        state = self.app.state.server
        state.draining = True
        deadline = time.monotonic() + self.drain_timeout
        started = time.monotonic()
        drain_log.info("draining: %d requests running, new ones get 503 and /health 503; up to %.0f s",
                       state.busy, self.drain_timeout)
        while state.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        cut = state.busy
        if cut:
            drain_log.info("drain timeout: ending %d requests that still run", cut)
            state.stop.set()
            await asyncio.sleep(0.2)  # let their last events go out
        drain_log.info("drained in %.1f s (%d requests cut): shutting down", time.monotonic() - started, cut)
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before any model loads: a port in use (or not ours to take) is a
    configuration error (ValueError: the CLI prints one line, exit 2) that costs no model load."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}; stop what holds the port or choose "
                         "another with --port") from e


def serve(settings, log_level: str = "info", say=log.info, sock: socket.socket | None = None) -> int:
    """Build the state, say the banner, serve on `sock` (bound here when not given); see the module docstring."""
    sock = sock or bind(settings.host, settings.port)

    def make_app():
        state = build_state(settings)
        for line in banner(state, settings):
            say(line)
        return create_app(settings, state)

    config = uvicorn.Config(None, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=2)
    DrainingServer(config, None, settings.drain_timeout_s, make_app).run(sockets=[sock])
    return 0


def _dtype(state, settings) -> str:
    """The dtype served: the setting, else what the backend chose (preferred_dtype on transformers)."""
    if settings.dtype:
        return settings.dtype
    if settings.backend == "vllm":
        return vllm_engine_args(settings)["dtype"]
    return state.engine.describe().get("dtype") or "default"


def banner(state, settings) -> list[str]:
    """The start-up lines: what is served, how, and where."""
    auth = "on (Authorization: Bearer KEY)" if settings.api_key else "off"
    info = state.engine.describe()
    device = info.get("device") or settings.device
    lines = [f"ReasonMaxxer serving {state.served_name!r} (model {settings.model}) on the {settings.backend} backend, "
             f"dtype {_dtype(state, settings)}, device {device}"]
    if device == "cpu":  # which kernels this CPU class got: bf16 speed differs by ISA (steering/cpu.py)
        cpu = describe()
        lines.append(f"  CPU {cpu['cpu']} ({cpu['isa']}), {cpu['threads']} threads: {info.get('kernels')}")
    if info.get("step"):
        lines.append(f"  decode step: {info['step']}")
    adapters = state.engine.adapters
    for name in sorted(adapters):
        lines.append("  adapter " + _describe(name, adapters[name]))
    if not adapters:
        lines.append("  no adapters: every request runs the base model (load one with --adapter DIR)")
    lines.append(f"  listening on http://{settings.host}:{settings.port}/v1 (API key {auth}; metrics "
                 f"{'open' if settings.metrics_open or not settings.api_key else 'behind the key'} at /metrics)")
    if settings.adapter_roots:
        lines.append(f"  adapter admin on: POST/DELETE /v1/adapters load and unload adapters under "
                     f"{', '.join(settings.adapter_roots)}")
        if not settings.api_key:
            lines.append("  WARNING: adapter admin is on without an API key: anyone who reaches this port can load "
                         "and unload adapters; set --api-key")
    return lines


def _describe(name: str, adapter) -> str:
    manifest = getattr(adapter, "manifest", None)
    if manifest is None:  # a teacher model
        return f"{name}: teacher, tau {getattr(adapter, 'tau', '?')}"
    rate = manifest.gate.measured_fire_rate
    return (f"{name}: {manifest.kind}, tau {manifest.gate.tau:.3g} nats"
            + (f", fire rate {rate:.1%} at fit time" if rate is not None else "")
            + " (request it as model id, or steering.adapter)")
