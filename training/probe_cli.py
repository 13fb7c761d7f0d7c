"""`reasonmaxxer probe-branches`: the causal test of the premise (training/probe.py) from the command line.

Contract: `add_arguments(parser)` adds the flags; `run_probe_command(config)` (a `ProbeBranchesConfig`, built once
from the flags) checks that the rollouts read no evaluation rows and came from `--model`, picks and scores the
answers, then decodes every branch (vLLM by default) into `--out`/branches.jsonl (resumable; a folder with other
settings is refused) and returns that path. The summary is made by `reasonmaxxer.clients.probe_report`; the
subcommand (reasonmaxxer/probe_branches_cli.py) chains the two, so neither package imports the other.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

from reasonmaxxer import models
from reasonmaxxer.steering.manifest import base_identity

from .cli_config import ProbeBranchesConfig, build_verifier, decode_engine
from .cli_flags import DTYPE_HELP, device_flag, fast_flag, json_object
from .config import ProbeConfig
from .preflight import check_backends
from .problems import check_not_evaluation

__all__ = ["add_arguments", "run_probe_command"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--model", required=True, help="the base model the rollouts came from")
    p.add_argument("--rollouts", required=True, help="rollout JSONL of a training pool (never evaluation rows)")
    p.add_argument("--out", required=True, help="output folder: meta.json, branches.jsonl (resumable), summary")
    p.add_argument("--wrong", type=int, default=40, help="wrong answers to branch (default 40)")
    p.add_argument("--right", type=int, default=40, help="right answers to branch (default 40)")
    p.add_argument("--per-problem", type=int, default=2, help="at most this many answers of each kind per problem")
    for f in fields(ProbeConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{f.metadata['help']} (default {f.default})")
    p.add_argument("--backend", default="vllm", choices=["transformers", "vllm"], help="decode engine (default vllm)")
    p.add_argument("--vllm-args", type=json_object, default=None, metavar="JSON",
                   help="more vllm engine arguments (default: none)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32", "auto"],
                   help=DTYPE_HELP)
    fast_flag(p)
    p.add_argument("--verifier-fallbacks", default="boxed", help="answer extractors in order (as for rollouts)")
    device_flag(p)


def run_probe_command(config: ProbeBranchesConfig) -> Path:
    """Plan (pick answers, score them), then continue every branch; returns the branches file."""
    from .probe import plan, run_probe  # torch
    from .rollouts import load_rollouts

    engine = config.engine
    check_backends(engine)
    meta, records = load_rollouts(config.rollouts)
    check_not_evaluation(meta.get("problems", {}), "the probed rollouts' problem selection")
    out = Path(config.out)
    settings = {"rollouts": str(Path(config.rollouts).resolve()), "model": meta["model"],
                "sampling": meta["sampling"], "wrong": config.wrong, "right": config.right,
                "per_problem": config.per_problem,
                "config": {k: v for k, v in asdict(config.probe).items() if k != "concurrency"}}
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()) != settings:
        raise ValueError(f"{out} holds a probe with other settings: pass another --out, or delete it")
    model, tokenizer = models.load_model(engine.model, dtype=engine.dtype, device=models.resolve_device(engine.device))
    if base_identity(model, tokenizer, engine.model).fingerprint != meta["model"]["fingerprint"]:
        raise ValueError(f"{config.rollouts} was made with model {meta['model']['name']!r}, not {engine.model!r}")
    answers, points = plan(model, records, config.probe, config.wrong, config.right, config.per_problem)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps(settings, indent=2))
    if engine.backend == "vllm":
        del model
    decoder = decode_engine(engine, None if engine.backend == "vllm" else model, tokenizer)
    try:
        with build_verifier(config.verifier_fallbacks) as verifier:
            run_probe(decoder, answers, points, meta["sampling"], config.probe, verifier.score, out / "branches.jsonl")
    finally:
        if engine.backend == "vllm":
            decoder.close()
    return out / "branches.jsonl"
