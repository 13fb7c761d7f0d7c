"""Teachers over HTTP: chosen by model id or steering.adapter, reported, metered, loaded and refused by admin."""

from types import SimpleNamespace

import httpx
import openai
import pytest
from test_server import _metric, _serve, _state

from reasonmaxxer.server.app import ServerState, check_teacher_backend, create_app
from reasonmaxxer.server.settings import Settings
from reasonmaxxer.steering.adapters import AdapterError
from reasonmaxxer.steering.teacher import Teacher

from conftest import make_model, make_tokenizer


@pytest.fixture(scope="module")
def teacher_dir(tokenizer, tmp_path_factory):
    """A model folder with the served tokenizer: what `serve --teacher DIR` and admin load."""
    root = tmp_path_factory.mktemp("teacher-root")
    make_model(tokenizer, seed=7).save_pretrained(root / "big")
    tokenizer.save_pretrained(root / "big")
    stranger = make_tokenizer(vocab_size=330)
    make_model(stranger, seed=3).save_pretrained(root / "stranger")
    stranger.save_pretrained(root / "stranger")
    return root


@pytest.fixture(scope="module")
def server(tiny_model, tokenizer, teacher_dir):
    state, settings = _state(tiny_model, tokenizer, adapter_roots=[str(teacher_dir)], teacher_rate=0.2)
    state.engine.add_adapter(Teacher.create(make_model(tokenizer, seed=7), state.tokenizer, "teach", tau=3.0))
    uv, thread, url = _serve(create_app(settings, state))
    yield SimpleNamespace(url=url, state=state, root=teacher_dir,
                          client=openai.OpenAI(base_url=url + "/v1", api_key="x"))
    uv.should_exit = True
    thread.join(10)


def _steering(response) -> dict:
    return response.choices[0].model_extra["steering"]


def test_teacher_by_model_id_reports_its_tokens_and_is_metered(server):
    before = _metric(server.url, "reasonmaxxer_teacher_tokens_total")
    r = server.client.completions.create(model="teach", prompt="Solve step by step", max_tokens=12, temperature=0)
    st = _steering(r)
    assert st["adapter"] == "teach" and st["mode"] == "gated" and st["threshold"] == 3.0
    assert st["gate_fired"] > 0 and st["teacher_tokens"] > 0
    assert _metric(server.url, "reasonmaxxer_teacher_tokens_total") - before == st["teacher_tokens"]
    ids = [m.id for m in server.client.models.list()]
    assert "teach" in ids
    listed = {a["id"]: a for a in httpx.get(server.url + "/v1/adapters").json()["data"]}
    assert listed["teach"]["kind"] == "teacher" and listed["teach"]["base_model"] == "tiny"


def test_teacher_by_steering_in_every_mode_and_top_k_zero(server):
    for mode, extra in (("always", {"top_k": 0}), ("random", {"rate": 0.5}), ("gated", {"threshold": 1e9})):
        r = server.client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weng earns"}], max_tokens=8, temperature=0,
            extra_body={"steering": {"adapter": "teach", "mode": mode, **extra}})
        st = r.choices[0].model_extra["steering"]
        assert st["mode"] == mode
        assert (st["gate_fired"] == 0) == (mode == "gated"), st
        assert (st["teacher_tokens"] == 0) == (mode == "gated"), st


def test_top_k_zero_on_an_adapter_is_a_400(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny-head", "prompt": "x", "max_tokens": 2,
                                                         "steering": {"top_k": 0}})
    assert r.status_code == 400 and "for teachers only" in r.json()["error"]["message"]


def test_admin_loads_a_teacher_folder_and_refuses_another_vocabulary(server):
    r = httpx.post(server.url + "/v1/adapters", json={"path": str(server.root / "stranger")})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "cannot steer this model" in message and "vocabularies differ" in message
    assert httpx.post(server.url + "/v1/completions", json={"model": "teach", "prompt": "x",
                                                            "max_tokens": 2}).status_code == 200
    r = httpx.post(server.url + "/v1/adapters", json={"path": str(server.root / "big")})
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "teacher"
    r = server.client.completions.create(model="big", prompt="Natalia", max_tokens=6, temperature=0,
                                         extra_body={"steering": {"mode": "random"}})  # the server's teacher_rate
    assert _steering(r)["rate"] == 0.2
    assert httpx.delete(server.url + "/v1/adapters/big").status_code == 200


def test_a_teacher_is_refused_on_vllm_with_what_to_use_instead():
    with pytest.raises(AdapterError, match=r"transformers backend only.*--backend transformers"):
        check_teacher_backend(Settings(backend="vllm"), "qwen2.5-coder-1.5b-instruct")


def test_start_up_refuses_a_teacher_with_another_vocabulary(tiny_model, tokenizer, teacher_dir):
    from reasonmaxxer.server.app import load_teacher_for

    state, settings = _state(tiny_model, tokenizer)
    teacher = load_teacher_for(settings, str(teacher_dir / "stranger"))
    with pytest.raises(AdapterError, match="vocabularies differ"):
        state.engine.add_adapter(teacher)
    assert isinstance(state, ServerState) and "stranger" not in state.engine.adapters


def _serve_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "reasonmaxxer.cli", "serve", *args], capture_output=True,
                          text=True, timeout=120)


def test_serve_refuses_a_teacher_with_another_vocabulary_in_one_line(tiny_model, tokenizer, teacher_dir, tmp_path):
    base = tmp_path / "base"
    tiny_model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    done = _serve_cli("--model", str(base), "--no-bundled-adapter", "--teacher", str(teacher_dir / "stranger"))
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "vocabularies differ" in errors[0] and "Traceback" not in done.stderr
    done = _serve_cli("--model", str(base), "--backend", "vllm", "--teacher", str(teacher_dir / "big"))
    assert done.returncode == 2 and "teachers run on the transformers backend only" in done.stderr
    assert "Traceback" not in done.stderr


def test_ab_teacher_arms_report_what_the_teacher_cost(server, tmp_path):
    import json

    from reasonmaxxer.clients.ab import AbConfig, aggregate, parse_arms, run_ab
    from reasonmaxxer.clients.client import SteeringClient
    from reasonmaxxer.training.problems import load_problems

    problems_file = tmp_path / "p.jsonl"
    problems_file.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                     for q, a in (("What is 2+3?", "5"), ("What is 4+4?", "8"))))
    problems = load_problems(problems_file)
    arms = parse_arms("base,teach:gated@3.0,teach:random@0.3,teach:always")
    records = run_ab(SteeringClient(server.url, max_retries=0), "tiny", problems, arms,
                     AbConfig(max_tokens=8, concurrency=4), tmp_path / "ab", lambda text, gold, trunc: 0.0,
                     progress=False)
    stats = aggregate(records, arms)["arms"]
    assert "teacher_tokens_per_answer" not in stats["base"]
    for name in ("teach:gated@3", "teach:random", "teach:always"):
        arm = next(v for k, v in stats.items() if k.startswith(name))
        assert arm["teacher_tokens_per_answer"] > 0 and arm["teacher_tokens_per_token"] > 0, (name, arm)
    always = stats["teach:always"]
    assert always["fire_rate_mean"] == 1.0 and always["teacher_tokens_per_token"] >= 1.0
