"""`reasonmaxxer probe-branches`: the causal test of the premise (training/probe.py) from the command line.

Contract: `add_command(subparsers)` registers the subcommand; `run_probe_command(args)` checks that the
rollouts read no evaluation rows and came from `--model`, picks and scores the answers, then decodes every
branch (vLLM by default) into `--out`/branches.jsonl (resumable; a folder with other settings is refused)
and returns that path. The summary is made by `reasonmaxxer.clients.probe_report` (the top-level CLI
chains the two, so neither package imports the other).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from reasonmaxxer.steering.models import resolve_device

from .cli import _device_flag, _fingerprint, _rollout_engine, _verifier, json_object
from .cli_flags import DTYPE_HELP, fast_flag

__all__ = ["add_command", "run_probe_command"]


def add_command(sub) -> None:
    from .probe import ProbeConfig

    p = sub.add_parser("probe-branches", help="the causal test of the premise: force base alternatives at "
                                              "decision points and at random positions, continue, score")
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
    _device_flag(p)
    p.set_defaults(func=run_probe_command)


def run_probe_command(args) -> Path:
    """Plan (pick answers, score them), then continue every branch; returns the branches file."""
    from reasonmaxxer.steering.models import load_model

    from .preflight import check_backends
    from .probe import ProbeConfig, plan, run_probe
    from .problems import check_not_evaluation
    from .rollouts import load_rollouts

    check_backends(args)
    meta, records = load_rollouts(args.rollouts)
    check_not_evaluation(meta.get("problems", {}), "the probed rollouts' problem selection")
    config = ProbeConfig(**{f.name: getattr(args, f.name) for f in fields(ProbeConfig)})
    out = Path(args.out)
    settings = {"rollouts": str(Path(args.rollouts).resolve()), "model": meta["model"], "sampling": meta["sampling"],
                "wrong": args.wrong, "right": args.right, "per_problem": args.per_problem,
                "config": {k: v for k, v in vars(config).items() if k != "concurrency"}}
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()) != settings:
        raise ValueError(f"{out} holds a probe with other settings: pass another --out, or delete it")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=resolve_device(args.device))
    if _fingerprint(model, tokenizer, args.model) != meta["model"]["fingerprint"]:
        raise ValueError(f"{args.rollouts} was made with model {meta['model']['name']!r}, not {args.model!r}")
    answers, points = plan(model, records, config, args.wrong, args.right, args.per_problem)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps(settings, indent=2))
    args.concurrency = config.concurrency
    if args.backend == "vllm":
        del model
    engine = _rollout_engine(args, None if args.backend == "vllm" else model, tokenizer)
    try:
        with _verifier(args) as verifier:
            run_probe(engine, answers, points, meta["sampling"], config, verifier.score, out / "branches.jsonl")
    finally:
        if args.backend == "vllm":
            engine.close()
    return out / "branches.jsonl"
