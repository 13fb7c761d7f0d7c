"""Prompt building: the exact prompt token ids a rollout starts from.

Contract:

- ``PAPER_PROMPT``: the paper's raw-text prompt for base models (no chat template); ``{problem}`` is the
  only placeholder (filled by ``str.replace``: the prompt also holds a literal ``\\boxed{}``).
- ``PAPER_STOP`` / ``default_stop(style)``: the stop strings a raw-prompt completion ends at (the model
  would otherwise write the next "Human:" turn itself); none for chat.
- ``CHAT_INSTRUCTION``: appended (after a newline) to the question in the chat-style user message.
- ``STYLES = ("auto", "paper", "chat")``. ``prompt_style_for(tokenizer, style)`` resolves "auto" to "chat"
  when the tokenizer has a chat template, else "paper"; asking for "chat" without a template raises
  ValueError.
- ``build_prompt_text(tokenizer, question, style)`` -> the prompt as text (for display and logs).
- ``build_prompt_ids(tokenizer, question, style)`` -> ``list[int]``: "paper" tokenizes the raw prompt with
  the tokenizer's own special-token (BOS) behaviour; "chat" is ``apply_chat_template`` of one user message
  with ``add_generation_prompt=True``, normalised to a plain list of ints whatever container the
  transformers version returns. These ids are stored with rollouts and never re-derived from text.
"""

from __future__ import annotations

from typing import Any

PAPER_PROMPT = (
    "Solve the following math problem step by step. Put your final answer in \\boxed{}.\n\n"
    "Problem: {problem}\n\nSolution:"
)
CHAT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
STYLES = ("auto", "paper", "chat")
# The released code's stop strings for raw prompts (reasonmaxxer/config.py STOP_SEQUENCES; its "\nHuman:"
# variants are covered, since a stop string matches anywhere in the text).
PAPER_STOP = ("Human:", "Assistant:")


def default_stop(style: str) -> tuple[str, ...]:
    """Stop strings of a resolved prompt style: the released ones for "paper", none for "chat" (EOS ends it)."""
    return PAPER_STOP if style == "paper" else ()


def paper_prompt(question: str) -> str:
    """The paper's raw prompt for ``question``."""
    return PAPER_PROMPT.replace("{problem}", question)


def chat_messages(question: str) -> list[dict[str, str]]:
    """The single user message of the chat-style prompt."""
    return [{"role": "user", "content": f"{question}\n{CHAT_INSTRUCTION}"}]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_style_for(tokenizer: Any, style: str = "auto") -> str:
    """Resolve ``style`` ("auto", "paper" or "chat") to "paper" or "chat" for this tokenizer."""
    if style not in STYLES:
        raise ValueError(f"Unknown prompt style {style!r}; use one of {', '.join(STYLES)}.")
    if style == "auto":
        return "chat" if _has_chat_template(tokenizer) else "paper"
    if style == "chat" and not _has_chat_template(tokenizer):
        raise ValueError(
            "Prompt style 'chat' needs a tokenizer with a chat template, and this one has none. "
            "Use --prompt-style paper (the paper's raw prompt for base models) or auto."
        )
    return style


def _as_int_list(result: Any) -> list[int]:
    """Token ids from whatever ``apply_chat_template`` returned (list, BatchEncoding/dict, tensor, batch of 1)."""
    if hasattr(result, "keys"):
        result = result["input_ids"]
    if hasattr(result, "tolist"):
        result = result.tolist()
    result = list(result)
    if result and isinstance(result[0], list | tuple):
        if len(result) != 1:
            raise ValueError(f"Expected the token ids of one prompt, got a batch of {len(result)}.")
        result = list(result[0])
    return [int(t) for t in result]


def build_prompt_text(tokenizer: Any, question: str, style: str = "auto") -> str:
    """The prompt as text (what ``build_prompt_ids`` encodes, special tokens included for chat)."""
    if prompt_style_for(tokenizer, style) == "paper":
        return paper_prompt(question)
    return tokenizer.apply_chat_template(chat_messages(question), add_generation_prompt=True, tokenize=False)


def build_prompt_ids(tokenizer: Any, question: str, style: str = "auto") -> list[int]:
    """The exact prompt token ids for ``question`` in ``style``; see the module docstring."""
    if prompt_style_for(tokenizer, style) == "paper":
        return _as_int_list(tokenizer(paper_prompt(question))["input_ids"])
    result = tokenizer.apply_chat_template(
        chat_messages(question), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return _as_int_list(result)
