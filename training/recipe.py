"""Recipes: named presets of `rollouts` and `fit` settings; `--recipe paper` is the paper's released recipe.

Contract: `resolve(args, recipe, defaults)` fills every attribute of `args` that is None (the flag was not
given) from `RECIPES[recipe]`, else from `defaults`; a flag given on the command line always wins. The
resolved recipe name is kept in `args.recipe`. `ROLLOUT_DEFAULTS` are the plain defaults of the rollout
flags; the fit flags' plain defaults are `FitArgs`' field defaults.

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

from typing import Any

__all__ = ["RECIPES", "ROLLOUT_DEFAULTS", "resolve"]

ROLLOUT_DEFAULTS: dict[str, Any] = {
    "samples": 20, "temperature": 0.6, "top_p": 0.95, "prompt_style": "auto", "max_new_tokens": 384,
}

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {
        # rollouts (examples/qwen25_1p5b/02_generate_score_3x100x20.sh, reasonmaxxer/eval_lib.py)
        "samples": 20, "temperature": 0.6, "top_p": 0.95, "prompt_style": "paper",
        # selection and trim (03_select_mid50_trim80.sh)
        "fit_keep_problems": 50, "fit_trim": 0.8,
        # data and loss (04_train_tau1p4.sh: prepare_training_data --tau_pos/--tau_neg 1.4)
        "fit_threshold": 1.4, "fit_adv_clip": 2.5, "fit_kl_weight": 0.2, "fit_order": "curriculum",
        # optimisation (04_train_tau1p4.sh: train_reasonmaxxer.py)
        "fit_lr": 1e-4, "fit_epochs": 2, "fit_max_steps": 149, "fit_warmup": 50, "fit_warmup_cap": False,
        "fit_accumulation": 8, "fit_grad_clip": 1.0, "fit_checkpoint_every": 0.15, "fit_autocast": "bfloat16",
        "fit_rank": 32, "fit_lora_alpha": 64,
    },
}


def resolve(args: Any, recipe: str | None, defaults: dict[str, Any]) -> Any:
    """Fill the unset (None) attributes of `args` named in `defaults` from the recipe, else the default."""
    name = recipe or "default"
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: use one of {', '.join(sorted(RECIPES))}")
    preset = RECIPES[name]
    for key, default in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, preset.get(key, default))
    args.recipe = name
    return args
