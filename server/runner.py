"""Running the app under uvicorn with the drain users of a load balancer expect.

Contract: `serve(app, settings, log_level)` runs until SIGTERM or SIGINT. The first signal starts the drain:
new requests get 503 (`shutting_down`), running ones go on for up to `settings.drain_timeout_s` seconds;
whatever still runs then ends with a last event that says the server is shutting down (a stream: an error
event in OpenAI's shape, then `data: [DONE]`; a plain request: a 503), connections close, the engine stops,
and the process exits 0, within the timeout plus a second or two. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

__all__ = ["DrainingServer", "serve"]

log = logging.getLogger("reasonmaxxer.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, drain_timeout: float):
        super().__init__(config)
        self.app, self.drain_timeout = app, drain_timeout
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self._loop is None or not self.started:
            return super().handle_exit(sig, frame)  # a second signal (or one before start-up): uvicorn's exit
        self._draining = True  # not recorded as captured: uvicorn would re-raise it at exit (status 143)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.drain()))

    async def drain(self) -> None:
        state = self.app.state.server
        state.draining = True
        deadline = time.monotonic() + self.drain_timeout
        log.info("draining: %d requests running, up to %.0f s", state.busy, self.drain_timeout)
        while state.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.busy:
            log.info("drain timeout: ending %d requests", state.busy)
            state.stop.set()
            await asyncio.sleep(0.2)  # let their last events go out
        self.should_exit = True


def serve(app, settings, log_level: str = "info") -> int:
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=2)
    DrainingServer(config, app, settings.drain_timeout_s).run()
    return 0
