"""The flags of `reasonmaxxer rollouts` and `reasonmaxxer fit` (training/cli.py runs them).

Contract: `rollouts_parser(sub)` and `fit_parser(sub)` add the subcommands and return them. Every flag has
help that ends with its default (flags whose default comes from a recipe say it in their text); one name per
concept across subcommands: `--max-tokens` is the completion budget everywhere (`--max-new-tokens` stays a
hidden alias). The argparse types (`json_object`, ...) raise ArgumentTypeError with the form to use.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from reasonmaxxer.steering.models import DEVICE_HELP

from .recipe import RECIPES, ROLLOUT_DEFAULTS

__all__ = ["FIT_FLAGS", "fit_parser", "json_object", "rollouts_parser"]

FIT_FLAGS = {"seed": "fit_seed"}  # FitArgs fields whose flag would clash with a rollout flag
_FIT_CHOICES = {"kind": ("head", "lora"), "order": ("shuffle", "curriculum"), "autocast": ("none", "bfloat16"),
                "teacher_target": ("kl", "argmax")}
_FIT_HELP = {"kind": "head: a low-rank correction of the final hidden state; lora: a PEFT LoRA",
             "order": "shuffle: seeded, per epoch; curriculum: |A| x decision density, descending",
             "autocast": "lora: autocast of the forwards"}
_FIT_METAVARS = {"threshold": "TAU|calibrate", "name": "NAME", "warmup_cap": "BOOL"}
# the default is steering.models.preferred_dtype
DTYPE_HELP = "model dtype (default: bfloat16, or float32 on a CPU without native bf16: AVX2 only)"
MODEL_HELP = "a known name (see `reasonmaxxer prepare-model --help`), a local Hugging Face folder or a hub id"


def json_object(text: str) -> dict:
    """argparse type: a JSON object (engine arguments passed through to vLLM)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('give a JSON object, e.g. \'{"enforce_eager": true}\'')
    return value


def _problem_flags(p: argparse.ArgumentParser, prefix: str = "", required: bool = True) -> None:
    dash, what = (f"--{prefix}", "validation problems") if prefix else ("--", "problems")
    p.add_argument(f"{dash}problems", required=required, metavar="FILE",
                   help=f"JSONL file of {what} (or hf:NAME[:split])" + ("" if required else " (default: none)"))
    p.add_argument(f"{dash}preset", default=None, metavar="NAME",
                   help="gsm8k, svamp, math500, ... (default: from the path, else plain question/answer fields)")
    p.add_argument(f"{dash}question-field", default=None, metavar="FIELD",
                   help="question field(s), comma-separated to join (default: the preset's)")
    p.add_argument(f"{dash}answer-field", default=None, metavar="FIELD",
                   help="gold answer field (default: the preset's)")
    p.add_argument(f"{dash}limit", type=int, default=None, metavar="N", help="how many problems (default: all)")
    p.add_argument(f"{dash}offset", type=int, default=0, metavar="I",
                   help="first problem (after the seeded shuffle, if any)")
    p.add_argument(f"{dash}selection-seed", type=int, default=None, metavar="SEED",
                   help="shuffle rows with this seed first (default: file order)")


def _recipe_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a preset of settings; paper: the paper's released recipe (flags given still win) "
                        "(default: default)")


def _rollout_flags(p: argparse.ArgumentParser) -> None:
    d = ROLLOUT_DEFAULTS
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help=f"rollouts per problem (default: {d['samples']})")
    p.add_argument("--max-tokens", dest="max_new_tokens", type=int, default=None, metavar="N",
                   help=f"completion budget per rollout; hitting it scores 0 (default: {d['max_new_tokens']})")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"sampling temperature (default: {d['temperature']})")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help=f"nucleus mass (default: {d['top_p']})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; a sample's seed derives from it, the row and "
                                                       "the sample index")
    p.add_argument("--prompt-style", default=None, choices=["auto", "chat", "paper"],
                   help="auto: chat when the tokenizer has a template; paper: the raw prompt (default: auto; "
                        "the paper recipe: paper)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable) (default: the prompt style's: paper: Human:, Assistant:; chat: none)")
    p.add_argument("--concurrency", type=int, default=32, metavar="N", help="requests decoded together")
    p.add_argument("--backend", default="transformers", choices=["transformers", "vllm"],
                   help="decode engine for the rollouts: transformers (embedded) or vllm (faster; see "
                        "docs/vllm.md)")
    p.add_argument("--vllm-args", type=json_object, default=None, metavar="JSON",
                   help='more vllm engine arguments (--backend vllm), e.g. \'{"enforce_eager": true}\' (default: none)')
    fast_flag(p)
    p.add_argument("--verifier-fallbacks", default="boxed", metavar="LIST",
                   help="answer extractors tried in order, comma-separated: boxed, gsm8k, answer_is, last_number")


def fast_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true",
                   help="transformers backend: decode with the engine's fast paths, as the server does (fused "
                        "step, prepacked linears; SmolLM2 rollouts at 32 streams ran 1.3-1.5x faster on a CPU). "
                        "They equal the reference path to rounding, so sampled text can part from it after a few "
                        "tokens (default: off: the reference path, whose numerics docs/results.md's recipe results "
                        "were made with)")


def _device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def _model_flags(p: argparse.ArgumentParser, dtype: str | None, dtype_help: str = "model dtype") -> None:
    p.add_argument("--model", default="smollm2-135m-instruct", metavar="NAME", help=MODEL_HELP)
    p.add_argument("--dtype", default=dtype, choices=["bfloat16", "float16", "float32", "auto"],
                   help=dtype_help)
    _device_flag(p)


def rollouts_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("rollouts", help="sample K rollouts per problem from the base and score them",
                       description="Sample --samples rollouts per problem from the base model, score each with the "
                       "verifier and append it to --out as it finishes (rerun the same command to resume).")
    _model_flags(p, None, DTYPE_HELP)
    _problem_flags(p)
    _recipe_flag(p)
    _rollout_flags(p)
    p.add_argument("--out", required=True, metavar="FILE", help="rollout JSONL (resumed if it exists)")
    return p


def fit_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("fit", help="fit a correction adapter from rollouts (or run the rollouts first)",
                       description="Fit a head or LoRA correction adapter from a rollout file, or sample the "
                       "rollouts first with --problems.")
    _model_flags(p, None, "model dtype (default: float32 for lora; for head bfloat16, or float32 on a CPU without "
                 "native bf16: AVX2 only)")
    p.add_argument("--rollouts", default=None, metavar="FILE",
                   help="rollout JSONL; with --problems it is written first (default: OUT.rollouts.jsonl)")
    _problem_flags(p, required=False)
    _rollout_flags(p)
    _problem_flags(p, prefix="val-", required=False)
    p.add_argument("--val-samples", type=int, default=2, metavar="K", help="samples per validation problem")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter directory to write")
    p.add_argument("--score-cache", default=None, metavar="DIR",
                   help="keep the teacher-forced scores here and reuse them: a refit on the same rollouts and "
                        "model skips the scoring pass (head: seconds instead of minutes) (default: none)")
    p.add_argument("--tau-sweep", type=_floats, default=None, metavar="TAU,TAU,...",
                   help="refit one adapter per tau (e.g. 1.0,1.4,1.8) from one scoring pass; keep the best on "
                        "validation (needs --val-problems); the adapter records the sweep (default: none)")
    p.add_argument("--teacher", default=None, metavar="MODEL",
                   help="distil this model's choices at the decision points instead of the rollouts' rewards: a model "
                        "with the base's tokenizer (known name or folder); the loss there is KL(teacher || adapted) "
                        "on the base top-k candidates (see --teacher-target) (default: none: the contrastive fit)")
    p.add_argument("--val-mode", default="gated", choices=["gated", "always"],
                   help="the mode checkpoints are scored in on validation: the mode the adapter will be served in")
    p.add_argument("--val-backend", default="transformers", choices=["transformers", "vllm"],
                   help="the engine that scores checkpoints (vllm: about twice as fast on a CPU)")
    _recipe_flag(p)
    _fit_arg_flags(p)
    return p


def _fit_arg_flags(p: argparse.ArgumentParser) -> None:
    """One flag per FitArgs field (default None: the recipe's value, else FitArgs' default, shown in the help)."""
    from .fit import FitArgs  # torch: imported only when `fit` is the command

    for f in fields(FitArgs):
        if f.name == "lora_targets":
            continue
        flag = "--" + FIT_FLAGS.get(f.name, f.name).replace("_", "-")
        paper = RECIPES["paper"].get("fit_" + f.name)
        shown = {"threshold": "calibrate", "name": "the --out folder's name"}.get(f.name, f.default)
        paper = f"; paper recipe: {paper}" if paper is not None and paper != f.default else ""
        extra = f" (default: {shown}{paper})"
        choices = _FIT_CHOICES.get(f.name)
        p.add_argument(flag, dest="fit_" + f.name, type=_fit_type(f), default=None, choices=choices,
                       metavar=None if choices else _FIT_METAVARS.get(f.name, _metavar(f.default)),
                       help=_FIT_HELP.get(f.name, f.metadata.get("help", "")) + extra)


def _metavar(default) -> str:
    if isinstance(default, str):
        return "NAME"
    return "N" if isinstance(default, int) and not isinstance(default, bool) else "X"


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"give numbers separated by commas, e.g. 1.0,1.4,1.8 ({e})") from e
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("give one or more taus >= 0, e.g. 1.0,1.4,1.8")
    return values


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError("give true or false")


def _threshold(text: str) -> float | str:
    if text == "calibrate":
        return text
    try:
        return float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError("give tau in nats, or 'calibrate' (to --target-fire-rate)") from e


def _fit_type(f):
    if f.name == "threshold":
        return _threshold
    if isinstance(f.default, bool):
        return _boolean
    return type(f.default)
