"""Adapter artifacts: save/load round trips, and refusal of corrupt or mismatched adapters."""

import json

import pytest
import torch
from safetensors.torch import save_file

from reasonmaxxer.steering.adapters import HeadAdapter, LoraAdapter, load_adapter
from reasonmaxxer.steering.manifest import AdapterError, Manifest

from conftest import make_model, make_tokenizer


def _head(model, tokenizer, **kw):
    return HeadAdapter.create(model, tokenizer, "h", rank=4, tau=2.5, b_std=0.1, seed=3, **kw)


def test_head_round_trip(tiny_model, tokenizer, tmp_path):
    adapter = _head(tiny_model, tokenizer, provenance={"seed": 3})
    adapter.save(tmp_path / "h")
    loaded = load_adapter(tmp_path / "h")
    assert isinstance(loaded, HeadAdapter)
    assert torch.equal(loaded.A, adapter.A) and torch.equal(loaded.B, adapter.B)
    assert loaded.manifest.to_dict() == adapter.manifest.to_dict()
    assert loaded.manifest.gate.tau == 2.5 and loaded.manifest.params["rank"] == 4
    loaded.validate(tiny_model, tokenizer)


def test_lora_round_trip(tiny_model, tokenizer, lora_setup, tmp_path):
    directory, _ = lora_setup
    adapter = load_adapter(directory)
    assert isinstance(adapter, LoraAdapter)
    assert len(adapter.weights) == 4 * tiny_model.config.num_hidden_layers
    assert adapter.scaling == pytest.approx(2.0)
    adapter.validate(tiny_model, tokenizer)
    adapter.save(tmp_path / "copy")
    again = LoraAdapter.load(tmp_path / "copy")
    assert all(torch.equal(again.weights[k][1], v[1]) for k, v in adapter.weights.items())


def test_missing_directory_and_files(tmp_path, tiny_model, tokenizer):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"adapter\.json"):
        load_adapter(tmp_path / "empty")
    _head(tiny_model, tokenizer).save(tmp_path / "h")
    (tmp_path / "h" / "adapter.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter\.safetensors is missing"):
        load_adapter(tmp_path / "h")


def test_corrupt_files(tmp_path, tiny_model, tokenizer):
    _head(tiny_model, tokenizer).save(tmp_path / "h")
    (tmp_path / "h" / "adapter.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        load_adapter(tmp_path / "h")
    (tmp_path / "h" / "adapter.json").write_text("{broken")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tmp_path / "h")


def test_nan_is_refused(tmp_path, tiny_model, tokenizer):
    adapter = _head(tiny_model, tokenizer)
    adapter.save(tmp_path / "h")
    b = adapter.B.clone()
    b[0, 0] = float("nan")
    save_file({"A": adapter.A, "B": b}, str(tmp_path / "h" / "adapter.safetensors"))
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter(tmp_path / "h")


def test_wrong_kind_and_format(tmp_path, tiny_model, tokenizer):
    _head(tiny_model, tokenizer).save(tmp_path / "h")
    with pytest.raises(AdapterError, match="is a 'head' adapter, not 'lora'"):
        LoraAdapter.load(tmp_path / "h")
    raw = json.loads((tmp_path / "h" / "adapter.json").read_text())
    for patch, message in [({"kind": "prefix"}, "unknown"), ({"format_version": 99}, "format_version"),
                           ({"gate": {"tau": -1}}, "tau")]:
        bad = {**raw, **patch}
        (tmp_path / "h" / "adapter.json").write_text(json.dumps(bad))
        with pytest.raises(AdapterError, match=message):
            load_adapter(tmp_path / "h")
    del raw["base_model"]
    (tmp_path / "h" / "adapter.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterError, match="base_model"):
        load_adapter(tmp_path / "h")


def test_wrong_hidden_size_and_vocab_are_refused(tiny_model, tokenizer):
    wide = make_model(tokenizer, hidden=128)
    with pytest.raises(AdapterError, match="hidden size 128 but the served model has 64"):
        _head(wide, tokenizer).validate(tiny_model, tokenizer)
    other_tok = make_tokenizer(vocab_size=300)
    small_vocab = make_model(other_tok)
    with pytest.raises(AdapterError, match="vocabulary of 300"):
        _head(small_vocab, other_tok).validate(tiny_model, tokenizer)


def test_same_shapes_different_base_is_refused(tiny_model, tokenizer):
    deeper = make_model(tokenizer, layers=3)
    with pytest.raises(AdapterError, match="different base"):
        _head(deeper, tokenizer).validate(tiny_model, tokenizer)


def test_tensor_shapes_must_match_manifest(tiny_model, tokenizer):
    adapter = _head(tiny_model, tokenizer)
    with pytest.raises(AdapterError, match="A must be"):
        HeadAdapter(adapter.manifest, adapter.A, adapter.B[:, :2])
    with pytest.raises(AdapterError, match="do not belong together"):
        HeadAdapter(adapter.manifest, adapter.A[:, :32], adapter.B[:32])


def test_lora_shape_mismatch_and_unsupported_options(tmp_path, tokenizer, tiny_model, lora_setup):
    from conftest import make_lora

    wide = make_model(tokenizer, hidden=128)
    make_lora(wide, tokenizer, tmp_path / "wide")
    # Forge the identity so only the module shapes disagree.
    manifest = Manifest.load(tmp_path / "wide")
    manifest.base_model = Manifest.load(lora_setup[0]).base_model
    manifest.save(tmp_path / "wide")
    with pytest.raises(AdapterError, match="refit on the served model"):
        load_adapter(tmp_path / "wide").validate(tiny_model, tokenizer)
    config = json.loads((tmp_path / "wide" / "adapter_config.json").read_text())
    (tmp_path / "wide" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(tmp_path / "wide")


def test_a_wrong_base_error_names_the_model_not_the_fitting_machines_cache_path():
    from reasonmaxxer.steering.manifest import BaseIdentity, check_identity

    fitted = BaseIdentity("/home/someone/.cache/reasonmaxxer/models/smollm2-135m-instruct", "LlamaForCausalLM", 576,
                          49152, "a" * 64)
    served = BaseIdentity("qwen2.5-coder-0.5b-instruct", "Qwen2ForCausalLM", 896, 151936, "b" * 64)
    with pytest.raises(AdapterError) as e:
        check_identity("head", fitted, served)
    assert "'smollm2-135m-instruct'" in str(e.value) and "/home/someone" not in str(e.value)
