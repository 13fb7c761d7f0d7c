"""Prompt building: exact token ids for the paper's raw prompt and for chat templates."""

from __future__ import annotations

import pytest

from reasonmaxxer.training.prompts import (
    CHAT_INSTRUCTION,
    PAPER_PROMPT,
    build_prompt_ids,
    build_prompt_text,
    paper_prompt,
    prompt_style_for,
)

QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips?"


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    from reasonmaxxer.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def test_paper_prompt_text():
    text = paper_prompt(QUESTION)
    assert text == (
        "Solve the following math problem step by step. Put your final answer in \\boxed{}.\n\n"
        f"Problem: {QUESTION}\n\nSolution:"
    )
    assert PAPER_PROMPT.count("{problem}") == 1


def test_paper_style_round_trips(tokenizer):
    assert prompt_style_for(tokenizer, "auto") == "paper"  # the tiny test tokenizer has no chat template
    ids = build_prompt_ids(tokenizer, QUESTION, "auto")
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    assert ids == tokenizer(paper_prompt(QUESTION))["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == paper_prompt(QUESTION)


def test_chat_without_template_and_unknown_style(tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        build_prompt_ids(tokenizer, QUESTION, "chat")
    with pytest.raises(ValueError, match="Unknown prompt style"):
        prompt_style_for(tokenizer, "fancy")


@pytest.mark.slow
def test_chat_style_ends_with_generation_prompt(smol):
    assert prompt_style_for(smol, "auto") == "chat"
    ids = build_prompt_ids(smol, QUESTION)
    assert isinstance(ids, list) and all(type(t) is int for t in ids)
    text = smol.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert f"{QUESTION}\n{CHAT_INSTRUCTION}" in text
    assert ids == smol(build_prompt_text(smol, QUESTION, "chat"), add_special_tokens=False)["input_ids"]
    generation = smol.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[-len(generation) :] == generation


@pytest.mark.slow
def test_paper_style_on_a_real_tokenizer(smol):
    ids = build_prompt_ids(smol, QUESTION, "paper")
    assert smol.decode(ids, skip_special_tokens=True) == paper_prompt(QUESTION)
    assert "<|im_start|>" not in smol.decode(ids)
