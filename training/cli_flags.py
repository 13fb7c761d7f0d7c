"""The flags the training subcommands share (rollouts_cli.py, fit_cli.py and probe_cli.py add them).

Contract: each `add_*` function adds one group of flags to a subcommand's parser. Every flag has help that ends
with its default (flags whose default comes from a recipe say it in their text); one name per concept across
subcommands: `--max-tokens` is the completion budget everywhere (`--max-new-tokens` stays a hidden alias). The
flags a recipe can set default to None (not given); the FitArgs flags collect the ones given in
`args.fit_flags`, a dict by FitArgs field (None: none given). cli_config.py turns the parsed flags into the typed
configs. The argparse types (`json_object`, `taus`, ...) raise ArgumentTypeError with the form to use.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from reasonmaxxer.models import DEVICE_HELP

from .config import FitArgs, RolloutConfig
from .recipe import PAPER_FIT, RECIPES

__all__ = ["DTYPE_HELP", "FIT_FLAGS", "MODEL_HELP", "add_fit_arg_flags", "add_model_flags", "add_problem_flags",
           "add_recipe_flag", "add_rollout_flags", "device_flag", "fast_flag", "json_object", "taus"]

FIT_FLAGS = {"seed": "fit_seed"}  # FitArgs fields whose flag would clash with a rollout flag: the flag's name
_FIT_CHOICES = {"kind": ("head", "lora"), "order": ("shuffle", "curriculum"), "autocast": ("none", "bfloat16"),
                "teacher_target": ("kl", "argmax")}
_FIT_HELP = {"kind": "head: a low-rank correction of the final hidden state; lora: a PEFT LoRA",
             "order": "shuffle: seeded, per epoch; curriculum: |A| x decision density, descending",
             "autocast": "lora: autocast of the forwards"}
_FIT_METAVARS = {"threshold": "TAU|calibrate", "name": "NAME", "warmup_cap": "BOOL"}
# the default is models.preferred_dtype
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


def add_problem_flags(p: argparse.ArgumentParser, prefix: str = "", required: bool = True) -> None:
    """--problems and the flags that select its rows; with `prefix` "val-", the validation split's."""
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


def add_recipe_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a preset of settings; paper: the paper's released recipe (flags given still win) "
                        "(default: default)")


def add_rollout_flags(p: argparse.ArgumentParser) -> None:
    """The sampling, engine and verifier flags of a rollout run (the ones a recipe sets default to None)."""
    d = RolloutConfig()
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help=f"rollouts per problem (default: {d.samples})")
    p.add_argument("--max-tokens", dest="max_new_tokens", type=int, default=None, metavar="N",
                   help=f"completion budget per rollout; hitting it scores 0 (default: {d.max_new_tokens})")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"sampling temperature (default: {d.temperature})")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help=f"nucleus mass (default: {d.top_p})")
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


def device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_model_flags(p: argparse.ArgumentParser, dtype_help: str) -> None:
    """--model, --dtype (default None: the command's, which `dtype_help` says) and --device."""
    p.add_argument("--model", default="smollm2-135m-instruct", metavar="NAME", help=MODEL_HELP)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32", "auto"], help=dtype_help)
    device_flag(p)


class _FitField(argparse.Action):
    """Stores a FitArgs flag's value in `namespace.fit_flags`, a dict by FitArgs field: the fit flags given."""

    def __init__(self, option_strings, dest, field: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.field = field

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), self.field: values})


def add_fit_arg_flags(p: argparse.ArgumentParser) -> None:
    """One flag per FitArgs field (not given: the recipe's value, else FitArgs' default, shown in the help)."""
    for f in fields(FitArgs):
        if f.name == "lora_targets":
            continue
        flag = "--" + FIT_FLAGS.get(f.name, f.name).replace("_", "-")
        paper = PAPER_FIT.get(f.name)
        shown = {"threshold": "calibrate", "name": "the --out folder's name"}.get(f.name, f.default)
        paper = f"; paper recipe: {paper}" if paper is not None and paper != f.default else ""
        extra = f" (default: {shown}{paper})"
        choices = _FIT_CHOICES.get(f.name)
        p.add_argument(flag, dest="fit_flags", field=f.name, action=_FitField, type=_fit_type(f), default=None,
                       choices=choices, metavar=None if choices else _FIT_METAVARS.get(f.name, _metavar(f.default)),
                       help=_FIT_HELP.get(f.name, f.metadata.get("help", "")) + extra)


def _metavar(default) -> str:
    if isinstance(default, str):
        return "NAME"
    return "N" if isinstance(default, int) and not isinstance(default, bool) else "X"


def taus(text: str) -> list[float]:
    """argparse type: taus >= 0, comma-separated (--tau-sweep)."""
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
