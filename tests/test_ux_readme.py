"""The README's OpenAI SDK example, run as written against `reasonmaxxer serve` (the default model and its
bundled adapter): it steers at the adapter's own gate and fires at a sensible rate (issue 14: it used to set
`threshold: 1.4` on an adapter whose tau is 3.16, firing on 32 of 54 tokens)."""

import re
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
    from reasonmaxxer.steering.manifest import Manifest
    from reasonmaxxer.training.bundled import default_adapter

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
