"""`/openapi.json` as the server behaves: errors are 4xx/5xx in OpenAI's error shape (never FastAPI's 422),
and the limits a request must respect are in the request schemas (`maximum`, `maxItems`).

Contract: `install_openapi(app, settings)` replaces `app.openapi` with a function that builds FastAPI's
schema once, then swaps every operation's 422 for a 400 with the `ErrorResponse` schema, adds the errors
every route can give (401 with an API key, 413, 500, and 503 on the inference routes), and writes the
settings' limits into the completion and chat request schemas, and the vocabulary's range into token ids
(the served model's, once the app's state is up).
"""

from __future__ import annotations

from typing import Any

from fastapi.openapi.utils import get_openapi

from .protocol import ErrorResponse

__all__ = ["install_openapi"]

_ERRORS = {"400": "invalid request", "401": "missing or wrong API key (with --api-key)",
           "413": "request body over --max-body-bytes", "500": "internal error"}
_INFERENCE = ("/v1/completions", "/v1/chat/completions")


def _limits(settings) -> dict[str, dict[str, Any]]:
    return {
        "n": {"maximum": settings.max_n},
        "max_tokens": {"maximum": settings.max_tokens_limit},
        "max_completion_tokens": {"maximum": settings.max_tokens_limit},
        "logprobs": {"maximum": settings.max_top_logprobs},
        "top_logprobs": {"maximum": settings.max_top_logprobs},
        "stop": {"description": f"at most {settings.max_stop} non-empty stop strings"},
    }


def install_openapi(app, settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _build(app, settings)
        return app.openapi_schema

    app.openapi = openapi


def _build(app, settings) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="OpenAI-compatible API with gated steering; errors in OpenAI's shape.")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in components["ErrorResponse"].pop("$defs", {}).items():
        components[name] = sub
    for key in ("HTTPValidationError", "ValidationError"):
        components.pop(key, None)
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            for status, text in _ERRORS.items():
                responses.setdefault(status, {"description": text, **ref})
            if path in _INFERENCE:
                responses["503"] = {"description": "queue full or shutting down: retry later", **ref}
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        props = components.get(model, {}).get("properties", {})
        for field, extra in _limits(settings).items():
            if field in props:
                props[field].update(extra)
    state = getattr(app.state, "server", None)
    bounds = {"minimum": 0, **({"maximum": len(state.tokenizer) - 1} if state is not None else {})}
    for model, field in (("CompletionRequest", "prompt"), ("DetokenizeRequest", "tokens")):
        _bound_integers(components.get(model, {}).get("properties", {}).get(field, {}), bounds)
    return schema


def _bound_integers(node: Any, bounds: dict[str, int]) -> None:
    """Token ids: every integer in a field's schema gets the vocabulary's range (as check_token_ids refuses)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node.update(bounds)
        for value in node.values():
            _bound_integers(value, bounds)
    elif isinstance(node, list):
        for value in node:
            _bound_integers(value, bounds)
