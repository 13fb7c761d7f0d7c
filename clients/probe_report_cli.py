"""`reasonmaxxer probe-report`: summarise a probe-branches folder (also one still running).

Contract: `add_arguments(parser)` adds the folder argument; `main(args)` writes summary.json and summary.md
beside the folder's branches.jsonl and prints the tables (probe_report.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .probe_report import write_summary

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="a `probe-branches --out` folder")


def main(args: argparse.Namespace) -> int:
    write_summary(Path(args.out) / "branches.jsonl")
    return 0
