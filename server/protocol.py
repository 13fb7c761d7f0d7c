"""The HTTP protocol: pydantic models of the OpenAI API, in OpenAI's field order; our extensions last.

Contract: request models validate types and ranges (pydantic raises, the app turns that into OpenAI's
error object with status 400). Unknown top-level fields are ignored, as OpenAI-compatible servers do;
unknown fields inside our own `steering` object are refused (a typo there would silently change
nothing). Fields of the OpenAI API that this server does not implement are accepted only at their
neutral value (e.g. `presence_penalty` 0, `suffix` empty) and refused otherwise with a message saying so.
`echo` returns the prompt before the completion and, with `logprobs`, the prompt's logprobs under the model
the request is served as (steered for an adapter's model id; see steering/prompt_logprobs.py).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    model_validator,
)

from reasonmaxxer.steering.modes import LOGPROBS_SOURCES, MAX_TOP_K, MODES, check_steering

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ErrorResponse",
    "SteeringOptions",
    "StreamOptions",
    "error_body",
    "make_id",
    "now",
]


def make_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _check_text(value: Any, where: str = "body") -> None:
    """Every string in a request must be valid Unicode: a lone surrogate (e.g. "\\ud800") cannot be encoded."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where}: the text is not valid Unicode (a lone surrogate at character {e.start}): "
                             "send UTF-8 text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, f"{where}.{k}" if where != "body" else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_text(v, f"{where}[{i}]")


class _Request(BaseModel):
    """Base of every request body: its strings are valid Unicode, checked before any field is parsed."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_text(data)
        return data


def _integral(value: Any) -> Any:
    """5.0 as 5: JSON Schema's integers include integral floats (so do clients' JSON encoders); 5.5, True and "5"
    stay what they are, and StrictInt refuses them."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


TokenId = Annotated[StrictInt, BeforeValidator(_integral)]


def _schema(**keywords: Any):
    """JSON-schema keywords for /openapi.json only: the field's validator refuses with its own message (what to
    fix), the schema says the same bound, so a client generated from the schema never sends what is refused."""

    def update(schema: dict[str, Any]) -> None:
        schema.update(keywords)

    return update


class SteeringOptions(BaseModel):
    """Extension: how to steer this request (reachable from the SDK through `extra_body`). The fields are the
    steering value's (`SteeringParams`), checked by its own rules (`check_steering`: one message per field
    everywhere); `mode` may be left out (gated with an adapter, else off)."""

    model_config = ConfigDict(extra="forbid")

    adapter: str | None = Field(default=None, description="registered adapter name")
    mode: str | None = Field(default=None, description="default: gated with an adapter; random: the random-position "
                             "control", json_schema_extra=_schema(enum=[*MODES, None]))
    threshold: float | None = Field(default=None, description="entropy gate in nats; default: the adapter's tau",
                                    json_schema_extra=_schema(minimum=0))
    top_k: int | None = Field(default=None, description="base top-k candidates a correction may move (0: a "
                              "teacher's full distribution)", json_schema_extra=_schema(minimum=0, maximum=MAX_TOP_K))
    trace: bool = Field(default=False, description="return the per-token trace")
    rate: float | None = Field(default=None, description="mode random: fire probability per token",
                               json_schema_extra=_schema(minimum=0, maximum=1))
    logprobs: str = Field(default="steered", description="distribution logprobs report",
                          json_schema_extra=_schema(enum=list(LOGPROBS_SOURCES)))

    @model_validator(mode="after")
    def _rules(self):
        check_steering(self.mode, self.threshold, self.top_k, self.rate, self.logprobs, self.trace)
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by both endpoints, OpenAI's first, then vLLM-style extensions. Floats must be finite."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    frequency_penalty: float = Field(default=0.0, description="only 0", json_schema_extra=_schema(minimum=0, maximum=0))
    presence_penalty: float = Field(default=0.0, description="only 0", json_schema_extra=_schema(minimum=0, maximum=0))
    logit_bias: dict[str, float] | None = Field(default=None, description="none or empty: a bias would change what "
                                                "the gate reads", json_schema_extra=_schema(maxProperties=0))
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = Field(default=None, description="only with stream: true")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    user: str | None = None
    # -- extensions ------------------------------------------------------------------------------------
    top_k: int = Field(default=0, ge=0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    ignore_eos: bool = False
    steering: SteeringOptions | None = None

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ValueError(f"{name} is not supported by this server: leave it at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server: it would change what the gate reads")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _only_with(field: str, value: Any) -> dict[str, Any]:
    """A schema that `field` equals `value` (and is given)."""
    return {"properties": {field: {"const": value}}, "required": [field]}


class CompletionRequest(_Sampling):
    # the cross-field rules of the validators, for /openapi.json (JSON Schema 2020-12, as OpenAPI 3.1 uses)
    model_config = ConfigDict(json_schema_extra=_schema(
        dependentSchemas={"stream_options": _only_with("stream", True)},
        **{"if": _only_with("max_tokens", 0), "then": _only_with("echo", True)}))

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="text, texts, token ids or lists of token ids (ids in the model's vocabulary)",
        json_schema_extra=_schema(minItems=1))
    best_of: int | None = Field(default=None, description="only 1: use n", json_schema_extra=_schema(minimum=1,
                                                                                                    maximum=1))
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0, description="default 16 (at most the server's limit); 0 only "
                                   "with echo: score the prompt, generate nothing")
    suffix: str | None = Field(default=None, description="not supported: none or empty",
                               json_schema_extra=_schema(maxLength=0))

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported: use n")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it is only allowed with echo: true (prompt logprobs)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be empty")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    """A content part: only text parts are supported (`{"type": "text", "text": "..."}`)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = Field(description="only 'text' parts are supported")
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(json_schema_extra=_schema(dependentSchemas={
        "stream_options": _only_with("stream", True), "top_logprobs": _only_with("logprobs", True)}))

    messages: list[ChatMessage] = Field(json_schema_extra=_schema(minItems=1))
    logprobs: bool = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = Field(default=None, description="only {'type': 'text'}",
                                                   json_schema_extra=_schema(properties={"type": {"const": "text"}}))
    tools: list[Any] | None = Field(default=None, description="not supported: none or empty",
                                    json_schema_extra=_schema(maxItems=0))
    top_logprobs: int | None = Field(default=None, ge=0, description="only with logprobs: true")

    @model_validator(mode="after")
    def _chat_checks(self):
        if not self.messages:
            raise ValueError("messages must not be empty: send at least one message")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error object, as JSON: the body of every error response and of a stream's last error event."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- extensions: vLLM's tokenizer routes (/tokenize, /detokenize, /tokenizer_info) ---------------------------
class TokenizeCompletionRequest(_Request):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(default=True, description="add the tokenizer's special tokens (e.g. BOS)")
    return_token_strs: bool | None = Field(default=False, description="also return the token strings")


class TokenizeChatRequest(_Request):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_schema(
        **{"if": _only_with("continue_final_message", True), "then": _only_with("add_generation_prompt", False)}))

    model: str | None = None
    messages: list[ChatMessage] = Field(json_schema_extra=_schema(minItems=1))
    add_generation_prompt: bool = Field(default=True, description="end with the assistant's turn opening")
    return_token_strs: bool | None = Field(default=False, description="also return the token strings")
    continue_final_message: bool = Field(default=False, description="leave the last message open-ended (with "
                                         "add_generation_prompt: false)")
    add_special_tokens: bool = Field(default=False, description="special tokens on top of the chat template's")

    @model_validator(mode="after")
    def _one_ending(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: set "
                             "add_generation_prompt to false")
        if not self.messages:
            raise ValueError("messages must not be empty: send at least one message")
        return self


class DetokenizeRequest(_Request):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[TokenId]
