"""`reasonmaxxer rollouts`: sample K rollouts per problem from the base and score them.

Contract: `add_arguments(parser)` adds the flags; `main(args)` builds `RolloutsConfig` once, checks everything
that can be checked before a model loads (the flags, the model name, the problem file and its fields, the output
path, a file to resume from), says what will run, samples (resumable), prints the summary as JSON and then its
warnings; Ctrl-C ends with one line that says what is kept and how to resume (exit 130). A bad input raises
ValueError / FileNotFoundError saying what to do (the top-level CLI prints one line and exits 2).
`sample(config, model, tokenizer, problems)` and `interrupted(config, problems)` are the steps `fit --problems`
shares.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from reasonmaxxer import models

from . import preflight
from .cli_config import EngineConfig, RolloutsConfig, build_verifier, decode_engine
from .cli_flags import DTYPE_HELP, add_model_flags, add_problem_flags, add_recipe_flag, add_rollout_flags
from .problems import ProblemSet

__all__ = ["add_arguments", "interrupted", "main", "sample"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Sample --samples rollouts per problem from the base model, score each with the verifier "
                          "and append it to --out as it finishes (rerun the same command to resume).")
    add_model_flags(parser, DTYPE_HELP)
    add_problem_flags(parser)
    add_recipe_flag(parser)
    add_rollout_flags(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="rollout JSONL (resumed if it exists)")


def main(args: argparse.Namespace) -> int:
    """Check, say what will run, sample; Ctrl-C ends with one line (exit 130), the end with warnings."""
    config = RolloutsConfig.from_args(args)
    problems, done = _preflight(config)
    sampling = config.sampling
    print(preflight.plan(len(problems), sampling.samples, sampling.max_new_tokens, done, config.out,
                         config.problems.limit is not None), file=sys.stderr)
    start = time.perf_counter()
    try:
        model, tokenizer = _load(config.engine)
        summary = sample(config, model, tokenizer, problems)
    except KeyboardInterrupt:
        print("\n" + interrupted(config, problems)[0], file=sys.stderr)
        return 130
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary, indent=2))
    for warning in preflight.warnings(summary, sampling.samples, sampling.max_new_tokens):
        print(warning, file=sys.stderr)
    return 0


def _preflight(config: RolloutsConfig) -> tuple[ProblemSet, int]:
    """Everything that can be checked before a model loads. Returns (problems, rollouts already in `out`)."""
    preflight.check_sampling(config)  # cheapest first: these need neither torch nor transformers
    preflight.check_output(config.out, "file")
    problems = config.problems.load()
    models.check_model_spec(config.engine.model)
    from .rollouts import resume_check  # torch

    return problems, resume_check(config.out, problems, config.sampling)


def _load(engine: EngineConfig):
    """(model, tokenizer) to sample from; vLLM loads the weights itself: (None, tokenizer)."""
    if engine.backend == "vllm":
        return None, models.load_tokenizer(engine.model)
    return models.load_model(engine.model, dtype=engine.dtype, device=models.resolve_device(engine.device))


def sample(config: RolloutsConfig, model, tokenizer, problems: ProblemSet) -> dict[str, Any]:
    """Sample and score the rollouts `config.out` is missing; `summarize` of the whole file."""
    from .rollouts import completed, run_rollouts  # torch

    done = completed(config.out, problems, config.sampling, tokenizer)
    if done is not None:
        print(f"{config.out} already holds every rollout of this run: nothing to sample", file=sys.stderr)
        return done
    engine = decode_engine(config.engine, model, tokenizer)
    try:
        with build_verifier(config.verifier_fallbacks) as verifier:
            return run_rollouts(engine, problems, config.sampling, config.out, verifier.score)
    finally:
        if config.engine.backend == "vllm":
            engine.close()


def interrupted(config: RolloutsConfig, problems: ProblemSet) -> tuple[str, bool]:
    """The Ctrl-C line of a rollout run (what `config.out` keeps, the command that resumes), and whether the run
    is complete."""
    from .rollouts import resume_check  # torch

    kept, total = resume_check(config.out, problems, config.sampling), len(problems) * config.sampling.samples
    return preflight.interrupted(config.out, kept, total, list(config.command)), kept >= total
