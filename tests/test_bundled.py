"""The adapters shipped in the package: present for the default model, loadable, fitted on it, documented."""

import pytest

from reasonmaxxer.bundled import bundled_adapters, default_adapter
from reasonmaxxer.models import DEFAULT_MODEL, load_model
from reasonmaxxer.steering.adapters import load_adapter


def test_the_default_model_has_a_bundled_adapter():
    assert default_adapter(DEFAULT_MODEL) is not None
    assert default_adapter("no-such-model") is None


@pytest.mark.parametrize("model, directory", [(m, d) for m, ds in bundled_adapters().items() for d in ds])
def test_bundled_adapters_load_and_record_how_they_were_made(model, directory):
    adapter = load_adapter(directory)
    prov = adapter.manifest.provenance
    assert prov["model"] == model and prov["command"].startswith("reasonmaxxer fit")
    assert prov["rollout_meta"]["model"]["fingerprint"] == adapter.manifest.base_model.fingerprint
    assert adapter.manifest.gate.measured_fire_rate > 0
    assert "validation" in adapter.manifest.metrics
    if model == DEFAULT_MODEL:
        model_obj, tok = load_model(model, dtype="bfloat16")
        adapter.validate(model_obj, tok)
