"""The FastAPI app: `create_app(settings)` with a lifespan that loads the model, engine and adapters.

Contract: nothing happens at import. `create_app(settings, state=None)` returns an app whose lifespan
builds a `ServerState` (model, tokenizer, engine thread, adapters, metrics) unless one is passed (tests
pass one built on a tiny model). Every error, including malformed JSON and validation failures, is
answered with OpenAI's error object; an unexpected exception is a 500 and the server keeps serving.
A body over `max_body_bytes` is a 413 before it is parsed.
Authentication is a pure ASGI middleware on the raw request path: with an API key set, every route but
`/health` (and `/metrics` when `metrics_open`) needs `Authorization: Bearer KEY`; the Host header and
the URL's host are never consulted.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reasonmaxxer import __version__
from reasonmaxxer.steering.adapters import load_adapter
from reasonmaxxer.steering.interfaces import ServingEngine

from .admin import check_name
from .admin import router as admin_router
from .backends import adapter_paths, check_teacher_backend, load_teacher_for, start_engine
from .metrics import Metrics
from .openapi import install_openapi
from .protocol import error_body
from .routes import router
from .serving import ApiError
from .settings import Settings
from .tokenize import router as tokenizer_router

__all__ = ["ServerState", "build_state", "create_app", "error_response"]

# A 503's Retry-After (seconds): a full queue frees within a few decode steps; a draining server is gone for
# good (a client that cannot pick another replica waits for the restart).
RETRY_AFTER_S = {"overloaded": 1, "shutting_down": 10}


@dataclass
class ServerState:
    settings: Settings
    engine: ServingEngine  # AsyncEngine (transformers) or VllmEngine
    tokenizer: Any
    served_name: str
    metrics: Metrics = field(init=False)
    adapter_paths: dict[str, str] = field(default_factory=dict)
    draining: bool = False  # SIGTERM: new requests get 503 while running ones finish
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set at the end of the drain: end what still runs

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine.num_running, lambda: self.engine.num_waiting)

    @property
    def busy(self) -> int:
        return self.engine.num_running + self.engine.num_waiting

    @property
    def adapters(self) -> list[str]:
        return sorted(self.engine.adapters)

    async def aclose(self) -> None:
        """Stop the engine: whatever still runs is cancelled (the drain is over). The event loop never waits on
        the engine's thread (it ends after its step or scoring piece in progress)."""
        await self.engine.aclose()


def build_state(settings: Settings) -> ServerState:
    """Start the backend's engine and load the adapters (the bundled one when none is given)."""

    if settings.teachers:  # before any model loads
        check_teacher_backend(settings, settings.teachers[0])
    paths = adapter_paths(settings)
    adapters = [load_adapter(p) for p in paths]
    engine, tokenizer, name = start_engine(settings, adapters)
    state = ServerState(settings, engine, tokenizer, name)
    for path, adapter in zip(paths, adapters, strict=True):
        check_name(adapter.name, name)
        engine.add_adapter(adapter)
        state.adapter_paths[adapter.name] = str(path)
    for spec in settings.teachers:
        teacher = load_teacher_for(settings, spec)
        check_name(teacher.name, name)
        engine.add_adapter(teacher)
        state.adapter_paths[teacher.name] = spec
    return state


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = param or (loc[0] if loc else None)
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


class AuthMiddleware:
    """Bearer-token check on the raw ASGI path; /health is always open, /metrics by setting."""

    def __init__(self, app, api_key: str | None, metrics_open: bool):
        self.app, self.key, self.metrics_open = app, api_key, metrics_open

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or self._open(scope.get("path", "")):
            return await self.app(scope, receive, send)
        given = [v for k, v in scope.get("headers") or [] if k == b"authorization"]
        if len(given) > 1:  # which one counts would be up to each proxy on the way: refuse to guess
            response = error_response(400, "the request has more than one Authorization header: send one",
                                      code="invalid_authorization")
            return await response(scope, receive, send)
        if given and hmac.compare_digest(given[0], f"Bearer {self.key}".encode()):
            return await self.app(scope, receive, send)
        response = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                  "authentication_error", code="invalid_api_key",
                                  headers={"WWW-Authenticate": 'Bearer realm="reasonmaxxer"'})
        return await response(scope, receive, send)

    def _open(self, path: str) -> bool:
        return path == "/health" or (self.metrics_open and path == "/metrics")


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_req: Request, exc: ApiError):
        retry = RETRY_AFTER_S.get(exc.code) if exc.status == 503 else None
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code,
                              headers={"Retry-After": str(retry)} if retry else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_req: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_, headers=exc.headers)  # 405 keeps Allow

    @app.exception_handler(Exception)
    async def internal_error(_req: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


def create_app(settings: Settings | None = None, state: ServerState | None = None) -> FastAPI:
    settings = settings or (state.settings if state else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.server = state or build_state(settings)
        try:
            await app.state.server.engine.ready()  # the vLLM engine checks that its plugin runs in vLLM
            yield
        finally:
            await app.state.server.aclose()

    app = FastAPI(title="ReasonMaxxer", version=_version(), lifespan=lifespan)
    _install_handlers(app)

    app.include_router(router)
    app.include_router(tokenizer_router)
    app.include_router(admin_router)
    app.add_middleware(CatchAll)  # innermost: an unexpected error is a 500 in OpenAI's shape, counted
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_key=settings.api_key, metrics_open=settings.metrics_open)
    app.add_middleware(StatusCounter)  # outermost: counts 401s and 413s too
    install_openapi(app, settings)
    return app


class CatchAll:
    """An exception no handler took becomes a 500 in OpenAI's shape here, inside StatusCounter (Starlette's
    own last-resort handler sits outside every middleware, where nothing would count it)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")
            await response(scope, receive, send)


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413 before the app parses it (by Content-Length, or
    while reading a chunked body)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        if length is not None or b"chunked" not in headers.get(b"transfer-encoding", b""):
            return await self.app(scope, receive, send)
        messages, size = [], 0  # chunked: read it all (bounded), then replay it to the app
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body is larger than this server's limit of {self.limit} "
                                  "bytes: send less (see --max-body-bytes)", code="request_too_large")
        await response(scope, receive, send)


class StatusCounter:
    """Counts responses by status code (pure ASGI, so streaming and disconnects pass through untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                server = getattr(scope["app"].state, "server", None) if "app" in scope else None
                if server is not None:
                    server.metrics.responses.labels(str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)


def _version() -> str:
    return __version__
