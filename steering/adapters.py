"""Correction adapters: the two kinds of DESIGN.md as dataclasses with save / load / validate.

An adapter is a directory: `adapter.json` (see `manifest.py`) plus tensors.

- `HeadAdapter` (`adapter.safetensors`, tensors `A` (r, d) and `B` (d, r), float32): a low-rank
  correction of the final hidden state h, read out only on the base top-k candidates c:
      logits'[c] = logits[c] + scale * W_U[c] (B A h),   other logits unchanged.
  It needs no extra forward pass. `scale` = 0 or B = 0 gives the base exactly.
- `LoraAdapter` (PEFT's own `adapter_config.json` + `adapter_model.safetensors`, so PEFT and vLLM load
  the directory directly): per target linear module, y = W x + scaling * B (A x), scaling = alpha / r
  (alpha / sqrt(r) with rsLoRA). `lora.py` applies it per row during decoding.

`load_adapter(path)` reads either kind and checks everything that needs no model (files, shapes,
dtypes, finite values); `adapter.validate(model, tokenizer)` checks it against the served base.
Every failure is an `AdapterError` whose message says what to fix.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .manifest import AdapterError, GateSpec, Manifest, base_identity, check_identity

__all__ = ["ARTIFACTS", "AdapterError", "HeadAdapter", "LoraAdapter", "load_adapter"]

HEAD_FILE = "adapter.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_UNSUPPORTED_LORA = {
    "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D models)", "modules_to_save": "modules_to_save",
    "alpha_pattern": "alpha_pattern", "layers_to_transform": "layers_to_transform",
}


def _read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} is missing; re-save or refit the adapter")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {path} is not a readable safetensors file ({e})") from e


def _check_tensor(name: str, key: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise AdapterError(f"adapter {name!r}: tensor {key} has dtype {t.dtype}; expected float32/16 or bfloat16")
    if not torch.isfinite(t).all():
        raise AdapterError(f"adapter {name!r}: tensor {key} holds NaN or infinite values; refit the adapter")


def _kind_check(manifest: Manifest, kind: str, path: Path) -> None:
    if manifest.kind != kind:
        raise AdapterError(
            f"{path} is a {manifest.kind!r} adapter, not {kind!r}: load it with load_adapter(), which "
            "dispatches on the kind in adapter.json"
        )


@dataclass
class HeadAdapter:
    """Low-rank correction of h read out on the base top-k candidates. A (r, d), B (d, r)."""

    manifest: Manifest
    A: torch.Tensor
    B: torch.Tensor

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def scale(self) -> float:
        return float(self.manifest.params.get("scale", 1.0))

    def __post_init__(self) -> None:
        _kind_check(self.manifest, "head", Path(self.name))
        for key, t in (("A", self.A), ("B", self.B)):
            _check_tensor(self.name, key, t)
        if self.A.dim() != 2 or self.B.dim() != 2 or self.B.shape != (self.A.shape[1], self.A.shape[0]):
            raise AdapterError(
                f"adapter {self.name!r}: A must be (r, d) and B (d, r); got A {tuple(self.A.shape)}, "
                f"B {tuple(self.B.shape)}"
            )
        if self.A.shape[1] != self.manifest.base_model.hidden_size:
            raise AdapterError(
                f"adapter {self.name!r}: A has width {self.A.shape[1]} but adapter.json says hidden size "
                f"{self.manifest.base_model.hidden_size}; the files do not belong together"
            )
        if not math.isfinite(self.scale):
            raise AdapterError(f"adapter {self.name!r}: params.scale must be finite, got {self.scale}")
        self.A, self.B = self.A.float().contiguous(), self.B.float().contiguous()
        self.manifest.params["rank"] = int(self.A.shape[0])

    @classmethod
    def create(
        cls, model: Any, tokenizer: Any, name: str, rank: int = 8, tau: float = 1.4, top_k: int = 5,
        b_std: float = 0.0, seed: int = 0, **manifest_fields: Any,
    ) -> HeadAdapter:
        """A fresh head adapter for `model`: A ~ N(0, 1/d), B ~ N(0, b_std^2) (b_std 0: the identity)."""
        g = torch.Generator().manual_seed(seed)
        d = int(model.config.hidden_size)
        a = torch.randn(rank, d, generator=g) / math.sqrt(d)
        b = torch.randn(d, rank, generator=g) * b_std
        manifest = Manifest(
            kind="head", name=name, base_model=base_identity(model, tokenizer), gate=GateSpec(tau=tau),
            top_k=top_k, params={"rank": rank, "scale": 1.0}, **manifest_fields,
        )
        return cls(manifest, a, b)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"A": self.A.contiguous(), "B": self.B.contiguous()}, str(directory / HEAD_FILE))
        self.manifest.save(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> HeadAdapter:
        directory = Path(directory)
        manifest = Manifest.load(directory)
        _kind_check(manifest, "head", directory)
        tensors = _read_tensors(directory / HEAD_FILE, manifest.name)
        missing = {"A", "B"} - set(tensors)
        if missing:
            raise AdapterError(f"adapter {manifest.name!r}: {HEAD_FILE} lacks tensor(s) {sorted(missing)}")
        return cls(manifest, tensors["A"], tensors["B"])

    def validate(self, model: Any, tokenizer: Any) -> None:
        """Raise AdapterError unless this adapter fits the served base model."""
        check_identity(self.name, self.manifest.base_model, base_identity(model, tokenizer))

    def to(self, device: torch.device | str) -> HeadAdapter:
        """This adapter with A and B on `device` (itself when they are there already)."""
        if self.A.device == torch.device(device):
            return self
        return HeadAdapter(self.manifest, self.A.to(device), self.B.to(device))

    def delta(self, hidden: torch.Tensor, cand: torch.Tensor, w_u: torch.Tensor) -> torch.Tensor:
        """scale * W_U[c] (B A h) for each row. hidden (n, d), cand (n, k), w_u (V, d) -> (n, k) float32.
        A and B meet `hidden` on its device: a no-op for an engine's copy (`Engine.add_adapter` moves it once),
        a copy for a fit's CPU snapshot scored on a GPU."""
        a, b = self.A.to(hidden.device), self.B.to(hidden.device)
        u = (hidden.float() @ a.T) @ b.T  # (n, d)
        rows = w_u[cand].float()  # (n, k, d)
        return self.scale * torch.einsum("nkd,nd->nk", rows, u)


@dataclass
class LoraAdapter:
    """A PEFT LoRA directory plus our adapter.json. `weights` maps a module name to (A (r, in), B (out, r))."""

    manifest: Manifest
    peft_config: dict[str, Any]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def scaling(self) -> float:
        r, alpha = self.peft_config["r"], self.peft_config.get("lora_alpha", self.peft_config["r"])
        return alpha / math.sqrt(r) if self.peft_config.get("use_rslora") else alpha / r

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (a, b) in self.weights.items():
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
        save_file(tensors, str(directory / PEFT_WEIGHTS))
        (directory / PEFT_CONFIG).write_text(json.dumps(self.peft_config, indent=2) + "\n")
        self.manifest.save(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> LoraAdapter:
        directory = Path(directory)
        manifest = Manifest.load(directory)
        _kind_check(manifest, "lora", directory)
        config = _read_peft_config(directory / PEFT_CONFIG, manifest.name)
        weights = _pair_lora_tensors(_read_tensors(directory / PEFT_WEIGHTS, manifest.name), manifest.name)
        return cls(manifest, config, weights)

    def validate(self, model: Any, tokenizer: Any) -> None:
        """Raise AdapterError unless every target module exists in the model with matching shapes."""
        check_identity(self.name, self.manifest.base_model, base_identity(model, tokenizer))
        modules = dict(model.named_modules())
        for module, (a, b) in self.weights.items():
            target = modules.get(module)
            if not isinstance(target, torch.nn.Linear):
                raise AdapterError(
                    f"adapter {self.name!r}: target module {module!r} is not a linear layer of the served model"
                )
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
                raise AdapterError(
                    f"adapter {self.name!r}: {module} is {target.in_features}->{target.out_features} but the "
                    f"adapter's A is {tuple(a.shape)} and B {tuple(b.shape)}; refit on the served model"
                )


def _read_peft_config(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {path} is missing; save the LoRA with PEFT's save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: {path} is not valid JSON ({e})") from e
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {name!r}: {path} has peft_type {config.get('peft_type')!r}; only LORA is served")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"adapter {name!r}: {path} needs an integer r >= 1")
    for key, what in _UNSUPPORTED_LORA.items():
        if config.get(key):
            raise AdapterError(f"adapter {name!r}: {what} is not supported; refit a plain LoRA without it")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: LoRA bias {config['bias']!r} is not supported; use bias='none'")
    return config


def _pair_lora_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, tuple[torch.Tensor, ...]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _check_tensor(name, key, t)
        stem = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B"):
            if stem.endswith(f".{part}.weight"):
                pairs.setdefault(stem.removesuffix(f".{part}.weight"), {})[part] = t
                break
        else:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} in {PEFT_WEIGHTS}")
    if not pairs:
        raise AdapterError(f"adapter {name!r}: {PEFT_WEIGHTS} holds no LoRA tensors")
    out = {}
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"adapter {name!r}: module {module} lacks its lora_A or lora_B tensor")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"adapter {name!r}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}; ranks do not match"
            )
        out[module] = (a, b)
    return out


ARTIFACTS: dict[str, type] = {"head": HeadAdapter, "lora": LoraAdapter}  # kind -> class with .load(directory)


def load_adapter(directory: str | Path) -> HeadAdapter | LoraAdapter:
    """Load an adapter directory of any registered kind (ARTIFACTS; corrections.register adds a new source's),
    validated on its own; call `.validate(model, tok)` next."""
    manifest = Manifest.load(directory)
    if manifest.kind == "teacher":
        raise AdapterError(f"{directory} declares kind 'teacher', which is not an adapter: a teacher is a model "
                           "folder, loaded with `serve --teacher DIR` or `load_teacher`")
    if manifest.kind not in ARTIFACTS:
        raise AdapterError(f"{directory} declares kind {manifest.kind!r}, which this installation cannot load: the "
                           f"adapter kinds are {', '.join(ARTIFACTS)}")
    return ARTIFACTS[manifest.kind].load(directory)
