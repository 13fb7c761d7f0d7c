"""An engine's own view of a model, so that building an engine leaves the caller's model as it found it.

Contract: `own_view(model)` returns a copy of the module tree that shares every parameter and buffer with
`model` (no tensor is copied: the view costs a few kB of Python objects) while its modules, their forwards and
hooks, its config and its training flag are its own. An engine packs linears (packed.py), switches the
attention implementation (attention.py), groups q/k/v and gate/up (fused.py), registers LoRA hooks (lora.py)
and sets eval mode on its view only: the caller's model keeps its modules, forwards, config and outputs, so a
`model.generate` after `Engine(model, ...)` is transformers' own. The weights are shared, so a weight changed
in place through either is seen by both (a packed copy repacks when its weight's version changes).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

__all__ = ["own_view"]


def own_view(model: Any) -> Any:
    """A module tree of its own over `model`'s tensors (see the module's contract)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared)  # deepcopy returns a memo's entry as is: the tensors stay shared
