"""The README as a reader meets it: a product page of at most MAX_LINES lines whose links resolve, whose CLI
commands parse as typed, and whose quick start runs: the OpenAI SDK example against `reasonmaxxer serve` (the
default model and its bundled adapter) steers at the adapter's own gate and fires at a sensible rate (it once
set `threshold: 1.4` on an adapter whose tau is 3.16, firing on 32 of 54 tokens)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import start_server, stop_server

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def sdk_example() -> str:
    """The first Python block of the server section."""
    section = README.split("## The server (`reasonmaxxer serve`)")[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_example_names_the_bundled_adapter_and_no_foreign_threshold():
    code = sdk_example()
    assert "smollm2-135m-instruct-svamp-head" in code and '"threshold"' not in code.split("extra_body")[1][:200]


@pytest.mark.slow
def test_the_sdk_example_fires_at_a_sensible_rate():
    from reasonmaxxer.bundled import default_adapter
    from reasonmaxxer.steering.manifest import Manifest

    tau = Manifest.load(default_adapter("smollm2-135m-instruct")).gate.tau
    proc, url = start_server([])
    try:
        namespace: dict = {}
        exec(sdk_example().replace("http://127.0.0.1:8000", url), namespace)
        report = namespace["r"].choices[0].model_extra["steering"]
    finally:
        stop_server(proc)
    assert report["adapter"] == "smollm2-135m-instruct-svamp-head" and report["threshold"] == pytest.approx(tau)
    assert report["tokens"] > 10 and 0 < report["fire_rate"] < 0.3, report


MAX_LINES = 300
ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Every command of the README's indented blocks that runs our CLI, continuation lines joined."""
    text = README.replace("\\\n", " ")
    return [" ".join(line.split("  #")[0].split()) for line in text.splitlines()
            if re.match(r"    (\.venv(-vllm)?/bin/)?reasonmaxxer ", line)]


def test_the_readme_is_a_product_page_with_live_links():
    """At most MAX_LINES lines; every relative link resolves; it speaks of itself, not of how it was made."""
    assert len(README.splitlines()) <= MAX_LINES, len(README.splitlines())
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links and all((ROOT / link).exists() for link in links if "://" not in link), \
        [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not re.search(r"this (vm|2-core)|\bsession \d|\bissue \d+|closing note", README, re.I)
    for doc in (ROOT / "docs").glob("*.md"):  # the docs it links to say where each figure ran, too
        text = doc.read_text()
        assert not re.search(r"this (vm|2-core)|\bsession \d|\bissue \d+|closing note", text, re.I), doc.name
        for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (doc.parent / link).exists() or (ROOT / link).exists(), (doc.name, link)


def test_every_readme_command_parses_as_typed():
    """Each `.venv/bin/reasonmaxxer ...` command of the README is a valid command line of today's CLI (the
    unknown-flag check included): a renamed flag fails here, not on a reader's machine."""
    from reasonmaxxer.cli import _refuse_unknown_flags, build_parser

    commands = readme_commands()
    assert len(commands) >= 5, commands
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] in (".venv/bin/reasonmaxxer", ".venv-vllm/bin/reasonmaxxer"), command
        name = next(a for a in argv[1:] if not a.startswith("-"))
        parser = build_parser(name)
        _refuse_unknown_flags(parser, name, argv[1:])
        parser.parse_args(argv[1:])


@pytest.mark.slow
def test_the_quick_start_runs_as_typed(tmp_path):
    """The quick start against a running default server: the metrics command and the `generate` command, as
    typed (the venv's script is this interpreter's module; the server's port is a free one)."""
    proc, url = start_server([])
    try:
        metrics = re.search(r"    (curl -s http://127\.0\.0\.1:8000/metrics .*)", README).group(1)
        namespace: dict = {}
        exec(sdk_example().replace("http://127.0.0.1:8000", url), namespace)  # so that there are counts
        out = subprocess.run(metrics.replace("http://127.0.0.1:8000", url), shell=True, capture_output=True,
                             text=True, timeout=60)
        assert 'reasonmaxxer_gate_fired_tokens_total{adapter="smollm2-135m-instruct-svamp-head"' in out.stdout, \
            out.stdout
    finally:
        stop_server(proc)
    generate = next(c for c in readme_commands() if " generate " in c and "my-svamp-head" not in c)
    argv = shlex.split(generate)[1:]
    run = subprocess.run([sys.executable, "-m", "reasonmaxxer.cli", *argv], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip(), run.stderr[-2000:]
    assert '"adapter": "smollm2-135m-instruct-svamp-head"' in run.stderr
