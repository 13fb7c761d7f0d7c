"""Per-row LoRA on a transformers model, through forward hooks on the target linear layers.

Contract: `LoraRouter.route({adapter_name: rows})` is a context manager; inside it, every forward of
the model adds, for each named adapter, scaling * B (A x) to the output of its target modules on the
given batch rows only (rows: int64 indices into the batch dimension). Outside it, the model is the base
model exactly (hooks return at once). The delta is computed in float32 and added to the layer output
the way PEFT does for inference (adapter weights kept in float32, result cast back to the layer dtype),
so a row routed to an adapter matches PEFT's own model on the same input up to float rounding.
Hooks exist only while at least one adapter is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .adapters import LoraAdapter

__all__ = ["LoraRouter"]


class LoraRouter:
    """Holds loaded LoRA adapters and applies them to chosen rows of a forward pass."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._modules = dict(model.named_modules())
        self._weights: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}  # module -> name ->
        self._handles: dict[str, Any] = {}
        self._routes: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> set[str]:
        return {name for per_module in self._weights.values() for name in per_module}

    def add(self, adapter: LoraAdapter) -> None:
        """Attach an adapter (already validated against this model)."""
        device = next(self.model.parameters()).device
        for module, (a, b) in adapter.weights.items():
            per_module = self._weights.setdefault(module, {})
            per_module[adapter.name] = (a.float().to(device), b.float().to(device), adapter.scaling)
            if module not in self._handles:
                self._handles[module] = self._modules[module].register_forward_hook(self._hook(module))

    def remove(self, name: str) -> None:
        for module in list(self._weights):
            self._weights[module].pop(name, None)
            if not self._weights[module]:
                del self._weights[module]
                self._handles.pop(module).remove()

    @contextmanager
    def route(self, routes: dict[str, torch.Tensor]) -> Iterator[None]:
        """Apply adapter `name` to batch rows `routes[name]` in forwards run inside this block."""
        unknown = set(routes) - self.names
        if unknown:
            raise KeyError(f"LoRA adapter(s) not loaded: {sorted(unknown)}")
        previous, self._routes = self._routes, {k: v for k, v in routes.items() if v.numel()}
        try:
            yield
        finally:
            self._routes = previous

    def _hook(self, module: str):
        def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            if not self._routes:
                return None
            adapters = self._weights.get(module, {})
            x = args[0]  # (B, S, in)
            result = None
            for name, rows in self._routes.items():
                if name not in adapters:
                    continue
                a, b, scaling = adapters[name]
                if result is None:
                    result = out.float()
                if rows.numel() == x.shape[0]:
                    result = result + (x.float() @ a.T) @ b.T * scaling
                else:
                    delta = (x[rows].float() @ a.T) @ b.T * scaling  # (R, S, out)
                    result = result.index_add(0, rows, delta)
            return None if result is None else result.to(out.dtype)

        return hook
