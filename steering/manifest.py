"""The adapter manifest (`adapter.json`) and the identity of a base model.

Contract: every adapter directory holds an `adapter.json` that `Manifest.load` reads and checks for
shape (format version, kind, required fields, value ranges), raising `AdapterError` with a message that
says what to fix. `base_identity(model, tokenizer)` computes what a manifest records about the base it
was fitted on; `check_identity` compares the two. The fingerprint hashes an allow-list of the model
config's architecture fields and the tokenizer vocabulary, so it does not change with the load dtype,
the folder the model lives in or the transformers version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "AdapterError",
    "BaseIdentity",
    "GateSpec",
    "Manifest",
    "base_identity",
    "check_identity",
    "config_identity",
]

FORMAT_VERSION = 1
KINDS = ["head", "lora", "teacher"]  # corrections.register adds a new source's; a teacher's manifest is in memory
MANIFEST_FILE = "adapter.json"

_IDENTITY_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
    "rms_norm_eps", "hidden_act",
)


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # adapter names: safe in URLs, paths and labels


class AdapterError(ValueError):
    """An adapter that cannot be used: the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class BaseIdentity:
    """What an adapter records about the base model it was fitted on."""

    name: str = field(metadata={"help": "model name or path the adapter was fitted on"})
    architecture: str = field(metadata={"help": "transformers class, e.g. LlamaForCausalLM"})
    hidden_size: int = field(metadata={"help": "width of the final hidden state h"})
    vocab_size: int = field(metadata={"help": "rows of the LM head"})
    fingerprint: str = field(metadata={"help": "sha256 of architecture config fields + tokenizer vocab"})


@dataclass
class GateSpec:
    """The gate calibrated at fit time: fire where base entropy > tau."""

    tau: float = field(metadata={"help": "entropy threshold in nats"})
    target_fire_rate: float | None = field(default=None, metadata={"help": "fraction aimed at"})
    measured_fire_rate: float | None = field(default=None, metadata={"help": "fraction measured at fit"})


@dataclass
class Manifest:
    """Contents of `adapter.json`. `params` holds kind-specific fields (e.g. head rank and scale)."""

    kind: str
    name: str
    base_model: BaseIdentity
    gate: GateSpec
    top_k: int = 5
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and NAME.fullmatch(self.name)):
            raise AdapterError(f"adapter name {self.name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                               "(1-128 characters, starting with a letter or digit); fix 'name' in adapter.json")
        if self.kind not in KINDS:
            raise AdapterError(f"adapter kind {self.kind!r} is unknown: use one of {', '.join(KINDS)}")
        if not (isinstance(self.top_k, int) and self.top_k >= 1):
            raise AdapterError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        tau = self.gate.tau
        if not isinstance(tau, (int, float)) or math.isnan(tau) or tau < 0:
            raise AdapterError(f"gate.tau must be a number >= 0 (nats), got {tau!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST_FILE
        if not Path(directory).is_dir():
            raise AdapterError(f"adapter directory {str(directory)!r} does not exist or is not a directory")
        if not path.is_file():
            raise AdapterError(
                f"{path} is missing: an adapter directory needs an adapter.json "
                "(write one with HeadAdapter.save / LoraAdapter.save, or `reasonmaxxer fit`)"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{path} is not valid JSON ({e}): re-save the adapter") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "adapter.json") -> Manifest:
        if not isinstance(raw, dict):
            raise AdapterError(f"{source} must hold a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise AdapterError(
                f"{source} has format_version {version!r}; this reasonmaxxer reads version {FORMAT_VERSION}: "
                "upgrade reasonmaxxer or refit the adapter"
            )
        try:
            base = BaseIdentity(**raw["base_model"])
            gate = GateSpec(**raw["gate"])
            rest = {k: raw[k] for k in ("top_k", "params", "provenance", "metrics") if k in raw}
            return cls(kind=raw["kind"], name=raw["name"], base_model=base, gate=gate, **rest)
        except KeyError as e:
            raise AdapterError(f"{source} lacks the required field {e.args[0]!r}") from e
        except TypeError as e:
            raise AdapterError(f"{source} has a malformed field: {e}") from e


def _fingerprint(config: Any, vocab: dict[str, int]) -> str:
    fields = {k: getattr(config, k) for k in _IDENTITY_FIELDS if getattr(config, k, None) is not None}
    blob = json.dumps({"config": fields, "vocab": sorted(vocab.items())}, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def base_identity(model: Any, tokenizer: Any, name: str | None = None) -> BaseIdentity:
    """The identity of a loaded transformers causal LM and its tokenizer."""
    rows = int(model.get_output_embeddings().weight.shape[0])
    return config_identity(model.config, tokenizer, rows, name, default_arch=type(model).__name__)


def config_identity(config: Any, tokenizer: Any, vocab_size: int | None = None, name: str | None = None,
                    default_arch: str = "unknown") -> BaseIdentity:
    """The identity of a base model from its config and tokenizer alone (no weights: the vLLM backend).
    `vocab_size` is the number of unembedding rows (default: config.vocab_size)."""
    archs = getattr(config, "architectures", None) or [default_arch]
    return BaseIdentity(
        name=name or _shown(getattr(config, "name_or_path", "")) or archs[0],
        architecture=archs[0],
        hidden_size=int(config.hidden_size),
        vocab_size=int(vocab_size if vocab_size is not None else config.vocab_size),
        fingerprint=_fingerprint(config, tokenizer.get_vocab()),
    )


def _shown(name: str) -> str:
    """A model name as another machine can use it: an absolute path (the fitting machine's cache or folder) by
    its last part, which for a prepared model is its known name; hub ids and known names as they are."""
    return Path(name).name if Path(name).is_absolute() else name


def check_identity(adapter_name: str, fitted: BaseIdentity, served: BaseIdentity) -> None:
    """Raise AdapterError unless the adapter was fitted on the served base model."""
    refit = f"serve it with the model it was fitted on ({_shown(fitted.name)!r}) or refit it on {_shown(served.name)!r}"
    if fitted.hidden_size != served.hidden_size:
        raise AdapterError(
            f"adapter {adapter_name!r} expects hidden size {fitted.hidden_size} but the served model has "
            f"{served.hidden_size}: {refit}"
        )
    if fitted.vocab_size != served.vocab_size:
        raise AdapterError(
            f"adapter {adapter_name!r} expects a vocabulary of {fitted.vocab_size} but the served model has "
            f"{served.vocab_size}: {refit}"
        )
    if fitted.architecture != served.architecture:
        raise AdapterError(
            f"adapter {adapter_name!r} was fitted on a {fitted.architecture} but the served model is a "
            f"{served.architecture}: {refit}"
        )
    if fitted.fingerprint != served.fingerprint:
        raise AdapterError(
            f"adapter {adapter_name!r} was fitted on a different base (fingerprint {fitted.fingerprint[:19]}..., "
            f"served {served.fingerprint[:19]}...; config or tokenizer differ): {refit}"
        )
