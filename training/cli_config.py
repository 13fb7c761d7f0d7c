"""The typed configs of the training commands, built once from the parsed flags, and where their engines are built.

Contract:
- `RolloutsConfig`, `FitConfig`, `ProbeBranchesConfig`: everything `reasonmaxxer rollouts`, `fit` and
  `probe-branches` run with, frozen. Each is built once, by its `from_args(args)` at the command's entry, from
  the flags argparse parsed (cli_flags.py); the recipe (recipe.py) is applied there, once, to the plain defaults
  (config.py's dataclasses), and the flags given win over it. Nothing is read from the argparse Namespace after.
- `ProblemSelection`: a problem file and which of its rows (`load()` reads them); `path` None: none given.
  `EngineConfig`: the model and the engine that decodes it.
- `build_engine(engine, model, tokenizer)`: the embedded decode engine; every command constructs it here,
  `generate`'s included. `decode_engine(engine, model, tokenizer)`: the engine of `engine.backend` (vLLM loads
  the weights itself). `build_verifier(fallbacks)`: the answer checker of `--verifier-fallbacks`.
- `name_of_folder(folder)`: an adapter name made from a folder's name (the default `--name` of `fit`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reasonmaxxer import models

from .config import FitArgs, ProbeConfig, RolloutConfig
from .problems import ProblemSet, load_problems
from .recipe import Preset, recipe
from .verifier import Verifier

if TYPE_CHECKING:
    import argparse

__all__ = ["EngineConfig", "FitConfig", "ProbeBranchesConfig", "ProblemSelection", "RolloutsConfig", "build_engine",
           "build_verifier", "decode_engine", "name_of_folder", "vllm_engine"]


@dataclass(frozen=True)
class ProblemSelection:
    """A problem file and which of its rows: `problems.load_problems`' arguments. `path` None: no file given."""

    path: str | None
    preset: str | None = None
    question_field: str | None = None
    answer_field: str | None = None
    offset: int = 0
    limit: int | None = None
    seed: int | None = None  # --selection-seed: shuffle the rows first

    def load(self) -> ProblemSet:
        """The selected problems; ValueError / FileNotFoundError saying what to pass."""
        return load_problems(self.path, preset=self.preset, question_field=self.question_field,
                             answer_field=self.answer_field, offset=self.offset, limit=self.limit, seed=self.seed)


@dataclass(frozen=True)
class EngineConfig:
    """The model a command loads and the engine that decodes it."""

    model: str  # a known name, a local Hugging Face folder or a hub id
    dtype: str | None = None  # None: the command's default (rollouts: models.preferred_dtype)
    device: str = "auto"
    backend: str = "transformers"  # transformers (embedded) | vllm
    fast: bool | None = False  # the embedded engine's fast paths (False: the reference step; None: where they apply)
    concurrency: int = 32  # sequences decoded together
    vllm_args: dict[str, Any] | None = None  # more vLLM engine arguments


@dataclass(frozen=True)
class RolloutsConfig:
    """`reasonmaxxer rollouts`: sample `sampling` on `problems` with `engine`, score the answers with the
    extractors `verifier_fallbacks` names, append them to `out`. `fit --problems` runs one into its rollout file."""

    engine: EngineConfig
    problems: ProblemSelection
    sampling: RolloutConfig
    verifier_fallbacks: str  # extractor names, comma-separated, as given
    out: Path
    command: tuple[str, ...]  # the command as typed, for the "run the same command to resume" lines

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RolloutsConfig:
        return cls(_engine(args), _problems(args), _preset(args, None).sampling, args.verifier_fallbacks,
                   Path(args.out), _command(args))


@dataclass(frozen=True)
class FitConfig:
    """`reasonmaxxer fit`: fit `fit` on the rollout file `rollouts.out` (sampled first, as `rollouts` does, when
    `rollouts.problems` names a file), score checkpoints on `val` (path None: no validation), save to `out`."""

    rollouts: RolloutsConfig
    fit: FitArgs
    out: str  # the adapter directory, as given (it is printed)
    val: ProblemSelection
    val_samples: int
    val_mode: str  # gated | always: the mode checkpoints are scored in
    val_backend: str  # transformers | vllm
    score_cache: str | None
    tau_sweep: tuple[float, ...] | None
    teacher: str | None  # a model spec to distil (--teacher)
    checkpoint_dir: str | None = None  # training states and validation results to resume from

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FitConfig:
        """ValueError when neither --rollouts nor --problems is given."""
        if not args.rollouts and not args.problems:
            raise ValueError("fit needs --rollouts R.jsonl (from `reasonmaxxer rollouts`) or --problems FILE")
        preset = _preset(args, FitArgs(name=name_of_folder(args.out)))  # named after its folder by default
        rollouts = RolloutsConfig(_engine(args), _problems(args), preset.sampling, args.verifier_fallbacks,
                                  Path(args.rollouts or Path(args.out).with_suffix(".rollouts.jsonl")), _command(args))
        val = ProblemSelection(args.val_problems, args.val_preset, args.val_question_field, args.val_answer_field,
                               args.val_offset, args.val_limit, args.val_selection_seed)
        return cls(rollouts, preset.fit, args.out, val, args.val_samples, args.val_mode, args.val_backend,
                   args.score_cache, tuple(args.tau_sweep) if args.tau_sweep else None, args.teacher,
                   args.checkpoint_dir)


@dataclass(frozen=True)
class ProbeBranchesConfig:
    """`reasonmaxxer probe-branches`: branch `wrong` wrong and `right` right answers of the rollout file
    `rollouts` (at most `per_problem` of each per problem) as `probe` says, decode with `engine`, write to `out`."""

    engine: EngineConfig  # its concurrency is the probe's
    rollouts: str
    out: str
    wrong: int
    right: int
    per_problem: int
    probe: ProbeConfig
    verifier_fallbacks: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ProbeBranchesConfig:
        probe = ProbeConfig(tau=args.tau, positions=args.positions, alternatives=args.alternatives,
                            continuations=args.continuations, seed=args.seed, concurrency=args.concurrency)
        return cls(_engine(args), args.rollouts, args.out, args.wrong, args.right, args.per_problem, probe,
                   args.verifier_fallbacks)


def _engine(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(args.model, args.dtype, args.device, args.backend, args.fast, args.concurrency,
                        args.vllm_args)


def _problems(args: argparse.Namespace) -> ProblemSelection:
    return ProblemSelection(args.problems, args.preset, args.question_field, args.answer_field, args.offset,
                            args.limit, args.selection_seed)


def _command(args: argparse.Namespace) -> tuple[str, ...]:
    return ("reasonmaxxer", *vars(args).get("argv", sys.argv[1:]))  # argv: set by the top-level CLI


def _preset(args: argparse.Namespace, fit: FitArgs | None) -> Preset:
    """The rollouts' sampling (and with `fit`, the fit's arguments): `--recipe` applied once to the plain defaults,
    then every flag given on top (a flag given always wins)."""
    plain = RolloutConfig(seed=args.seed, concurrency=args.concurrency,
                          stop=tuple(args.stop) if args.stop is not None else None)
    preset = recipe(args.recipe)(Preset(plain, fit))
    given = {"samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
             "max_new_tokens": args.max_new_tokens, "prompt_style": args.prompt_style}  # None: not given
    sampling = replace(preset.sampling, **{k: v for k, v in given.items() if v is not None})
    if preset.fit is None:
        return Preset(sampling)
    fit_given = dict(args.fit_flags or {})  # {FitArgs field: value} of the fit flags given (cli_flags.py)
    if fit_given.get("threshold") == "calibrate":
        fit_given["threshold"] = None
    return Preset(sampling, replace(preset.fit, **fit_given))


def name_of_folder(folder: str | Path) -> str:
    """An adapter name (manifest.NAME: letters, digits, '.', '_', '-') made from a folder's name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(folder).resolve().name).lstrip("._-")[:128]
    return name or "adapter"


def build_engine(engine: EngineConfig, model, tokenizer, max_batch_size: int = 32):
    """The embedded decode engine on `model` (the one place a command constructs it): `engine.fast` False is
    the reference step, True or None the fast paths wherever they apply (Engine's default step, "fused")."""
    from reasonmaxxer.steering.engine import Engine  # torch

    step = "reference" if engine.fast is False else "fused"
    return Engine(model, tokenizer, max_batch_size=max_batch_size, name=engine.model, step=step)


def decode_engine(engine: EngineConfig, model, tokenizer):
    """The engine of `engine.backend`, `engine.concurrency` sequences at a time: vLLM (which loads the weights
    itself: `model` may be None) or the embedded one on `model`. The caller closes a vLLM engine."""
    if engine.backend == "vllm":
        return vllm_engine(engine, tokenizer)
    # The reference numerics (fast=False) unless --fast: by default rollouts stay the ones the recipe's tests and
    # results were made with.
    return build_engine(engine, model, tokenizer, engine.concurrency)


def vllm_engine(engine: EngineConfig, tokenizer, lora_rank: int | None = None):
    """vLLM's offline engine on `engine.model`, in `engine.dtype` (else the preferred dtype of the device vLLM
    runs on), `engine.concurrency` sequences at a time, with `engine.vllm_args` over those; LoRA slots of
    `lora_rank`. The caller closes it."""
    from reasonmaxxer.steering.vllm.offline import VllmOfflineEngine  # vLLM

    engine_args = {"dtype": engine.dtype or models.preferred_dtype_here(), "max_num_seqs": engine.concurrency,
                   **(engine.vllm_args or {})}
    return VllmOfflineEngine.start(str(models.resolve_model(engine.model)), tokenizer, engine_args,
                                   name=engine.model, lora_rank=lora_rank)


def build_verifier(fallbacks: str) -> Verifier:
    """The answer checker of `--verifier-fallbacks` (extractor names, comma-separated)."""
    return Verifier(fallbacks=tuple(x.strip() for x in fallbacks.split(",") if x.strip()))
