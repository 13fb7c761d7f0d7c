"""Recipes: named presets of `rollouts` and `fit` settings; `--recipe paper` is the paper's released recipe.

Contract: a recipe is a function from a `Preset` (the rollouts' `RolloutConfig`, and for `fit` its `FitArgs`) to
a `Preset`, made with `dataclasses.replace`; `recipe(name)` is the one named (None: "default", which changes
nothing), ValueError for an unknown name. The commands apply it once, to the plain defaults (the dataclasses'
field defaults), and then put the flags given on top, so a flag given on the command line always wins
(training/cli_config.py). `PAPER_SAMPLING` and `PAPER_FIT` are the values the paper recipe sets (`fit --help` shows
them).

The paper recipe follows the released code (GitHub farukakgul/ReasonMaxxer @72182e9,
`examples/qwen25_1p5b/0[2-4]_*.sh`, `scripts/select_mid_pool.py`, `scripts/train_reasonmaxxer.py`):
20 rollouts per problem at T 0.6 / top-p 0.95 from the raw prompt with the `Human:` / `Assistant:` stops;
the 50 mixed problems closest to pass rate 0.5 (ties: fewer truncations, then shorter answers); the
globally shortest 80% of their rollouts; tau fixed at 1.4; the curriculum order (|A| x decision density,
descending); AdamW lr 1e-4, 50 warm-up steps and a linear decay sized for 2 epochs, stopped at step 149;
batch 1 x 8; a checkpoint every 15% of an epoch (each scored on the validation split when one is given);
bf16 autocast. Named departures (DESIGN.md, "Recipe"): the completion budget stays a flag (8192 in the
released MATH scripts; GSM8K answers here end well inside 512), and the head adapter uses the same
schedule as the LoRA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .config import FitArgs, RolloutConfig

__all__ = ["PAPER_FIT", "PAPER_SAMPLING", "RECIPES", "Preset", "recipe"]


@dataclass(frozen=True)
class Preset:
    """What a recipe sets: the rollouts' sampling and, for `fit`, the fit's arguments (None for `rollouts`)."""

    sampling: RolloutConfig
    fit: FitArgs | None = None


# rollouts (examples/qwen25_1p5b/02_generate_score_3x100x20.sh, reasonmaxxer/eval_lib.py)
PAPER_SAMPLING: dict[str, Any] = {"samples": 20, "temperature": 0.6, "top_p": 0.95, "prompt_style": "paper"}
PAPER_FIT: dict[str, Any] = {
    # selection and trim (03_select_mid50_trim80.sh)
    "keep_problems": 50, "trim": 0.8,
    # data and loss (04_train_tau1p4.sh: prepare_training_data --tau_pos/--tau_neg 1.4)
    "threshold": 1.4, "adv_clip": 2.5, "kl_weight": 0.2, "order": "curriculum",
    # optimisation (04_train_tau1p4.sh: train_reasonmaxxer.py)
    "lr": 1e-4, "epochs": 2, "max_steps": 149, "warmup": 50, "warmup_cap": False, "accumulation": 8,
    "grad_clip": 1.0, "checkpoint_every": 0.15, "autocast": "bfloat16", "rank": 32, "lora_alpha": 64,
}


def default(preset: Preset) -> Preset:
    """The plain defaults: `RolloutConfig`'s and `FitArgs`' own."""
    return preset


def paper(preset: Preset) -> Preset:
    """The paper's released recipe (this module's docstring)."""
    fit = replace(preset.fit, **PAPER_FIT) if preset.fit is not None else None
    return Preset(replace(preset.sampling, **PAPER_SAMPLING), fit)


RECIPES: dict[str, Callable[[Preset], Preset]] = {"default": default, "paper": paper}


def recipe(name: str | None) -> Callable[[Preset], Preset]:
    """The recipe called `name` (None: "default"); ValueError for an unknown one."""
    name = name or "default"
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]
