"""vLLM's tokenizer routes: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`, behind the same auth.

Contract (vLLM's shapes): `/tokenize` takes a text `prompt` (special tokens added by default) or chat
`messages` (rendered with the model's chat template, as the chat route does) and answers `count`,
`max_model_len`, `tokens` and, with `return_token_strs`, `token_strs`. `/detokenize` takes `tokens` and
answers `prompt`. `/tokenizer_info` answers the tokenizer's configuration and its class, with file paths
left out (they would tell a caller about the server's disks). `model`, where given, must be a served model
id (the base or an adapter: they share the tokenizer). Tokenizing runs off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from .protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from .serving import ApiError, check_model, check_token_ids

__all__ = ["router"]

router = APIRouter()

_PATH_KEYS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path", "special_tokens_map_file")


def _check_model(s, model: str | None) -> None:
    if model is not None:
        check_model(model, s.served_name, s.adapters)


def _tokenize(tokenizer, body) -> list[int]:
    if isinstance(body, TokenizeCompletionRequest):
        return list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                         continue_final_message=body.continue_final_message, tokenize=False)
    return list(tokenizer(text, add_special_tokens=body.add_special_tokens)["input_ids"])


@router.post("/tokenize")
async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> dict[str, Any]:
    s = request.app.state.server
    _check_model(s, body.model)
    try:
        ids = await asyncio.to_thread(_tokenize, s.tokenizer, body)
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", param="messages") from e
    strs = s.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": s.engine.max_model_len, "tokens": ids, "token_strs": strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    s = request.app.state.server
    _check_model(s, body.model)
    check_token_ids([body.tokens], len(s.tokenizer), param="tokens")
    return {"prompt": await asyncio.to_thread(s.tokenizer.decode, body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    tok = request.app.state.server.tokenizer
    config = {k: _plain(v) for k, v in (getattr(tok, "init_kwargs", None) or {}).items() if k not in _PATH_KEYS}
    config["tokenizer_class"] = type(tok).__name__
    if getattr(tok, "chat_template", None):
        config["chat_template"] = tok.chat_template
    return config


def _plain(value: Any) -> Any:
    """JSON-safe: AddedToken-like objects become their text."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
