"""Batched multi-LoRA on a transformers model: one gathered low-rank matmul per target layer.

Contract: `LoraRouter.route({adapter_name: rows})` is a context manager; inside it, every forward of the
model adds, for each named adapter, scaling * B (A x) to the output of its target modules on the given
batch rows only (rows: int64 indices into the batch dimension; a row takes at most one adapter). Outside
it, the model is the base model exactly (hooks return at once). Rows of any mix of adapters, or none, run
in one forward: each target module keeps every loaded adapter's A stacked into one (N*r, in) matrix and
B into one (out, N*r) (ranks padded to the largest r with zeros, zeros where an adapter does not target
the module), and its hook computes, for the whole batch,

    delta = ((x @ A_all^T) * m) @ B_all^T        # x (n, S, in) -> (n, S, N*r) -> (n, S, out)

with m (n, 1, N*r) holding, on each row, its adapter's scaling on that adapter's r columns and 0 elsewhere
(the S-LoRA / punica idea, in dense form: with a few adapters, N*r columns cost less than gathering
weights per row). A row with no adapter gets delta 0 exactly, so it is the base output. The delta is
computed in float32 and added the way PEFT does for inference (result cast back to the layer dtype), so
a routed row matches PEFT's own model up to float rounding. Hooks exist only while an adapter is loaded.
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
        self._adapters: dict[str, LoraAdapter] = {}  # in slot order
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A_all, B_all)
        self._rank = 0
        self._handles: dict[str, Any] = {}
        self._routes: dict[str, torch.Tensor] = {}
        self._masks: dict[int, torch.Tensor] = {}  # batch size -> m, for the routes in force

    @property
    def active(self) -> bool:
        """Whether a route is in force: some row of the forward being run takes an adapter."""
        return bool(self._routes)

    @property
    def names(self) -> set[str]:
        return set(self._adapters)

    def add(self, adapter: LoraAdapter) -> None:
        """Attach an adapter (already validated against this model)."""
        self._adapters[adapter.name] = adapter
        self._restack()

    def remove(self, name: str) -> None:
        if self._adapters.pop(name, None) is not None:
            self._restack()

    def _restack(self) -> None:
        """Rebuild every target module's stacked A and B, and its hook, for the adapters now loaded."""
        device = next(self.model.parameters()).device
        slots = list(self._adapters.values())
        self._rank = max((a.weights[m][0].shape[0] for a in slots for m in a.weights), default=0)
        modules = sorted({m for a in slots for m in a.weights})
        self._stacks = {}
        for module in modules:
            layer = self._modules[module]
            a_all = torch.zeros(len(slots) * self._rank, layer.in_features, device=device)
            b_all = torch.zeros(layer.out_features, len(slots) * self._rank, device=device)
            for s, adapter in enumerate(slots):
                if module in adapter.weights:
                    a, b = adapter.weights[module]
                    lo = s * self._rank
                    a_all[lo:lo + a.shape[0]] = a.float()
                    b_all[:, lo:lo + b.shape[1]] = b.float()
            self._stacks[module] = (a_all, b_all)
        for module in set(self._handles) - set(modules):
            self._handles.pop(module).remove()
        for module in set(modules) - set(self._handles):
            self._handles[module] = self._modules[module].register_forward_hook(self._hook(module))

    @contextmanager
    def route(self, routes: dict[str, torch.Tensor]) -> Iterator[None]:
        """Apply adapter `name` to batch rows `routes[name]` in forwards run inside this block."""
        unknown = set(routes) - self.names
        if unknown:
            raise KeyError(f"LoRA adapter(s) not loaded: {sorted(unknown)}")
        previous = self._routes, self._masks
        self._routes, self._masks = {k: v for k, v in routes.items() if v.numel()}, {}
        try:
            yield
        finally:
            self._routes, self._masks = previous

    def _mask(self, n: int, device: torch.device) -> torch.Tensor:
        """m (n, 1, N*r): each routed row's scaling on its adapter's columns, 0 elsewhere (built once per size)."""
        mask = self._masks.get(n)
        if mask is None:
            mask = torch.zeros(n, len(self._adapters), self._rank, device=device)
            slot = {name: s for s, name in enumerate(self._adapters)}
            for name, rows in self._routes.items():
                mask[rows.to(device), slot[name]] = self._adapters[name].scaling
            mask = self._masks[n] = mask.reshape(n, 1, -1)
        return mask

    def delta(self, module: str, x: torch.Tensor) -> torch.Tensor | None:
        """The routed adapters' float32 delta on `module`'s output for its input x (n, S, in) -> (n, S, out), or
        None when no route is in force or no loaded adapter targets the module (the output is then the base's)."""
        if not self._routes or module not in self._stacks:
            return None
        a_all, b_all = self._stacks[module]
        mask = self._mask(x.shape[0], x.device)  # (n, 1, N*r)
        return ((x.float() @ a_all.T) * mask) @ b_all.T

    def _hook(self, module: str):
        def hook(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor | None:
            delta = self.delta(module, args[0])
            return None if delta is None else (out.float() + delta).to(out.dtype)

        return hook
