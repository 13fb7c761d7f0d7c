"""`reasonmaxxer probe-branches`: the causal test of the premise: force base alternatives at decision points and
at random positions, continue, score.

Contract: `add_arguments(parser)` is training/probe_cli.py's; `main(args)` builds `ProbeBranchesConfig` once,
runs the probe (training makes the branch records) and then writes and prints their summary (clients summarises
them): this module chains the two, so neither package imports the other.
"""

from __future__ import annotations

import argparse

from reasonmaxxer.clients.probe_report import write_summary
from reasonmaxxer.training.cli_config import ProbeBranchesConfig
from reasonmaxxer.training.probe_cli import add_arguments, run_probe_command

__all__ = ["add_arguments", "main"]


def main(args: argparse.Namespace) -> int:
    write_summary(run_probe_command(ProbeBranchesConfig.from_args(args)))
    return 0
