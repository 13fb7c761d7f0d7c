"""The exact commands the Docker image runs (no Docker engine on these machines): its build step
`reasonmaxxer prepare-model`, its ENTRYPOINT `reasonmaxxer serve` with its ENV (the default model and the
bundled adapter), its HEALTHCHECK command, and a SIGTERM that drains a running request before exiting."""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from conftest import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _dockerfile() -> dict:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict = {"env": {}, "run": [], "user": None}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            out["env"].update(dict(kv.split("=", 1) for kv in shlex.split(rest)))
        elif word == "RUN":
            out["run"].append(rest.strip())
        elif word == "USER":
            out["user"] = rest.strip()
        elif word == "ENTRYPOINT":
            out["entrypoint"] = json.loads(rest)
        elif word == "HEALTHCHECK":
            out["healthcheck"] = json.loads(rest[rest.index("CMD") + 3 :])
    return out


def _exe(cmd: list[str]) -> list[str]:
    """Resolve the image's command names to this environment's executables."""
    return [str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0], *cmd[1:]]


def test_image_runs_as_non_root_and_its_commands_work():
    spec = _dockerfile()
    assert spec["user"] and not spec["user"].startswith(("root", "0"))
    assert spec["entrypoint"] == ["reasonmaxxer", "serve"]
    prepare = next(r for r in spec["run"] if r.startswith("reasonmaxxer prepare-model"))
    done = subprocess.run(_exe(shlex.split(prepare)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    port = free_port()
    env = {**os.environ, **{k: v for k, v in spec["env"].items() if k != "REASONMAXXER_CACHE"},
           "REASONMAXXER_HOST": "127.0.0.1", "REASONMAXXER_PORT": str(port), "REASONMAXXER_DRAIN_TIMEOUT_S": "60"}
    server = subprocess.Popen(_exe(spec["entrypoint"]), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(server, url, timeout=240)
        check = subprocess.run(_exe(spec["healthcheck"]), env=env, capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr
        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models[0] == "smollm2-135m-instruct" and len(models) >= 2, models  # the bundled adapter is served
        _sigterm_drains(server, url)
    finally:
        if server.poll() is None:
            server.kill()


def _sigterm_drains(server: subprocess.Popen, url: str) -> None:
    lines: list[str] = []
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Count to twenty."}],
            "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}

    def consume() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            lines.extend(line for line in r.iter_lines() if line)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.time() + 60
    while httpx.get(url + "/health").json()["running"] == 0:
        assert time.time() < deadline
        time.sleep(0.05)
    server.send_signal(signal.SIGTERM)
    reader.join(120)
    assert lines and lines[-1] == "data: [DONE]", lines[-3:]
    last = json.loads(lines[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["steering"]["tokens"] == 40
    assert server.wait(60) == 0  # a drained shutdown exits 0 (server/runner.py)
    log = server.stdout.read()
    assert "Application shutdown complete" in log, log[-2000:]


def test_compose_runs_the_server_and_a_prometheus_that_scrapes_it():
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    server, prom = compose["services"]["reasonmaxxer"], compose["services"]["prometheus"]
    assert server["build"] == "." and "8000:8000" in server["ports"]
    mount = next(v for v in prom["volumes"] if "prometheus.yml" in v).split(":")[0]
    scrape = yaml.safe_load((ROOT / mount).read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"][0]["targets"] == ["reasonmaxxer:8000"]
