"""The README's "your own adapter in a few minutes" recipe, run exactly as written (issue 14): the commands
between the `<!-- recipe -->` markers, with only `.venv/bin/reasonmaxxer` run as this interpreter's module and
`../shared/data` given as an absolute path (the README's commands run from the repository root; these run in
a temporary folder so that nothing is written into the checkout). It must yield mixed problems and an adapter.
SmolLM2 on this 2-core CPU: about 3 minutes idle, up to 20 under load."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def recipe_commands() -> list[list[str]]:
    """The README recipe's commands, continuation lines joined, each split as a shell would."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- recipe -->")[1]
    lines = [line.strip() for line in block.splitlines() if line.startswith("    ")]
    joined = " ".join(lines).replace("\\ ", " ")
    commands = [c.strip() for c in re.split(r"(?=\.venv/bin/reasonmaxxer )", joined)]
    return [shlex.split(c.split("  #")[0]) for c in commands if c]


def test_the_recipe_block_is_what_the_test_runs():
    commands = recipe_commands()
    assert [c[1] for c in commands] == ["fit", "generate"], commands
    assert all(c[0] == ".venv/bin/reasonmaxxer" for c in commands)  # as typed after the README's set-up


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason=f"no shared data folder at {DATA} (see MANIFEST.md)")
def test_the_readme_recipe_yields_an_adapter(tmp_path):
    from reasonmaxxer.steering.adapters import load_adapter

    commands, runs = recipe_commands(), []
    for command in commands:
        argv = [a.replace("../shared/data", str(DATA)) for a in command[1:]]
        run = subprocess.run([sys.executable, "-m", "reasonmaxxer.cli", *argv], cwd=tmp_path, capture_output=True,
                             text=True, timeout=3600)
        assert run.returncode == 0, (command, run.stderr[-3000:])
        runs.append(run)
    fit, generate = runs
    adapter = load_adapter(tmp_path / commands[0][commands[0].index("--out") + 1])
    data = adapter.manifest.provenance["data"]
    assert data["problems"] >= 1 and data["sequences"] >= 8, data  # the README says 1 mixed problem, 8 sequences
    if data["problems"] < 3:  # as the README says: the run warns and names what to change
        assert "mixed outcomes" in fit.stderr and "--samples" in fit.stderr, fit.stderr[-2000:]
    report = json.loads(generate.stderr.split("[steering] ")[-1].splitlines()[0])
    assert report["adapter"] == adapter.name and report["tokens"] > 0
