"""Shared fixtures: a tiny random Llama with a real (trained-in-code) byte-level BPE tokenizer.

Nothing here touches a network: the tokenizer is trained on a few lines of text at fixture time and the
model is randomly initialised with a fixed seed and a large init range, so that next-token entropies
spread over roughly 1.4-4.2 nats and greedy text does not loop: the gate has something to decide.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? The answer is \\boxed{72}.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "Let x be the number of apples. Then 3x + 5 = 20, so x = 5. Solve step by step.",
    "Überraschung: 東京 and émigré test multi-byte characters in the byte-level tokenizer.",
]


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_model(tokenizer)


@pytest.fixture(scope="session")
def prompts(tokenizer):
    texts = ["Natalia sold clips", "Solve step by step. 3x + 5 =", "How many", "Weng earns $12 an hour for"]
    return [tokenizer(t)["input_ids"] for t in texts]


def sampled_records(model, tokenizer, prompts, max_tokens: int, seed_base: int) -> list[dict]:
    """Rollout records of real sampled completions, 4 per prompt, rewarded 1, 0, 1, 0: every problem mixed."""
    from reasonmaxxer.steering.engine import Engine
    from reasonmaxxer.steering.request import Request
    from reasonmaxxer.steering.sampling import SamplingParams

    engine = Engine(model, tokenizer)
    records = []
    for p, prompt in enumerate(prompts):
        params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed_base * p + k) for k in range(4)]
        for k, c in enumerate(engine.generate([Request(prompt, sp) for sp in params])):
            records.append({"problem_id": f"p{p}", "sample": k, "prompt_ids": prompt, "completion_ids": c.token_ids,
                            "reward": float(k % 2 == 0)})
    return records


def make_lora(model, tokenizer, directory, name: str = "tiny-lora", seed: int = 1, r: int = 4):
    """Save a random PEFT LoRA (q/k/v/o) for `model` plus our adapter.json; return the PeftModel."""
    import copy

    from peft import LoraConfig, get_peft_model

    from reasonmaxxer.steering.manifest import GateSpec, Manifest, base_identity

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)  # strong enough to change greedy tokens of the tiny model
    peft_model.save_pretrained(str(directory))
    Manifest(
        kind="lora", name=name, base_model=base_identity(model, tokenizer), gate=GateSpec(tau=3.0),
        params={"r": r, "lora_alpha": 2 * r},
    ).save(directory)
    return peft_model


@pytest.fixture(scope="session")
def lora_setup(tiny_model, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora")
    return directory, make_lora(tiny_model, tokenizer, directory)


# -- servers as users run them: `reasonmaxxer serve` in a subprocess -----------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    """Return once `url`/health answers 200; fail with the server's last output if it exits or times out."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            output = proc.stderr or proc.stdout
            pytest.fail(f"server exited: {output.read()[-3000:] if output else proc.returncode}")
        assert time.time() < deadline, f"server did not start in {timeout:.0f} s"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)


def start_server(args: list[str], timeout: float = 300, env: dict | None = None,
                 merged_output: bool = False) -> tuple[subprocess.Popen, str]:
    """`reasonmaxxer serve ARGS` on a free port, healthy. Its stderr is kept for a failure message (with
    `merged_output`, stdout and stderr together on `proc.stdout`, for tests that read the log)."""
    port = free_port()
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT} if merged_output else \
        {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE}
    proc = subprocess.Popen([sys.executable, "-m", "reasonmaxxer.cli", "serve", "--port", str(port), *args],
                            text=True, env=env, **out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM (the drain), then kill if it has not exited within `timeout`."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


NEAR_TIE = 0.5  # logits apart by at most this (a few bf16 ulps at SmolLM2's logit scale) count as a tie


def assert_greedy_matches(ours: list[int], model, prompt: list[int], max_new_tokens: int) -> int:
    """Greedy tokens of an engine against `model.generate` on a model no engine touched, as vLLM's tests
    compare across kernels: equal up to the first position where the reference's top two logits are within
    NEAR_TIE of each other and ours took the other one; from there on the texts may part. Returns the number
    of tokens compared equal (all of them where no near-tie was met)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    ref = out.sequences[0, len(prompt):].tolist()
    for i, (a, b) in enumerate(zip(ours, ref, strict=False)):
        if a != b:
            scores = out.scores[i][0].float()  # (V,) the reference's logits at the first difference
            gap = float(scores[b] - scores[a])
            second = int(scores.topk(2).indices[1])
            assert a == second and gap <= NEAR_TIE, (
                f"tokens part at {i} where the reference is no near-tie: ours {a} (rank "
                f"{int((scores > scores[a]).sum())}), reference {b}, logit gap {gap:.3f} > {NEAR_TIE}")
            return i
    assert len(ours) == len(ref), f"ours has {len(ours)} tokens, the reference {len(ref)}"
    return len(ref)
