"""Adapters fitted by this project and shipped inside the package, one directory each.

Contract: `bundled_adapters()` maps a known model name (as `prepare-model` names it) to the directories of
the adapters bundled for it, best first; `default_adapter(model)` is the first of them or None;
`adapter_dir(value)` is `value` itself when it is a directory, else the bundled adapter of that name (the name
`/v1/models` shows), else `value` unchanged (loading it then says what is missing). How each
was made (the exact command) and what it measured are in its `adapter.json` and in docs/fitting.md.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["adapter_dir", "bundled_adapters", "default_adapter"]

HERE = Path(__file__).resolve().parent


def bundled_adapters() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for manifest in sorted(HERE.glob("*/adapter.json")):
        model = json.loads(manifest.read_text()).get("provenance", {}).get("model")
        if model:
            out.setdefault(model, []).append(manifest.parent)
    return out


def default_adapter(model: str) -> Path | None:
    found = bundled_adapters().get(model)
    return found[0] if found else None


def adapter_dir(value: str) -> str:
    """An `--adapter` value as a directory: a directory as given, else a bundled adapter's by its name."""
    if Path(value).is_dir():
        return value
    for dirs in bundled_adapters().values():
        for directory in dirs:
            if directory.name == value or json.loads((directory / "adapter.json").read_text()).get("name") == value:
                return str(directory)
    return value
