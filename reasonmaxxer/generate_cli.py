"""`reasonmaxxer generate`: one chat answer from the decode engine, optionally steered, and its gate report.

Contract: `add_arguments(parser)` adds the flags; `main(args)` checks the adapter (a directory, or a bundled
adapter by its name) against the model's config.json before the model loads, applies the chat template, and
prints the text as it is decoded, then the gate report as one `[steering] {...}` line on stderr. With `--trace`,
JSON lines on stdout instead: one per token (entropy, fired, base and chosen token), then the text and the
report. A bad adapter is a ValueError (the top-level CLI prints one line and exits 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from reasonmaxxer import models
from reasonmaxxer.bundled import adapter_dir
from reasonmaxxer.steering.modes import MODES, check_steering
from reasonmaxxer.training.cli_config import EngineConfig, build_engine
from reasonmaxxer.training.cli_flags import DTYPE_HELP, MODEL_HELP

from .serve_cli import check_adapter_dirs

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("prompt", help="the user message (the model's chat template is applied)")
    p.add_argument("--model", default="smollm2-135m-instruct", metavar="NAME", help=MODEL_HELP)
    p.add_argument("--adapter", default=None, metavar="DIR", help="an adapter directory (adapter.json + tensors), "
                   "or a bundled adapter's name as /v1/models shows it (default: none, the base model)")
    p.add_argument("--mode", default=None, metavar="MODE",
                   help=f"steering mode: {', '.join(MODES)} (default: gated with --adapter, else off)")
    p.add_argument("--threshold", type=float, default=None, metavar="TAU",
                   help="entropy gate in nats (default: the adapter's calibrated tau)")
    p.add_argument("--max-tokens", type=int, default=256, help="completion budget")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32", "auto"],
                   help=DTYPE_HELP)
    p.add_argument("--device", default="auto", help=models.DEVICE_HELP)
    p.add_argument("--trace", action="store_true", help="print JSON lines instead of the text: one per token "
                   "(entropy, fired, base and chosen token), then the text and the gate report")


def main(args: argparse.Namespace) -> int:
    check_steering(mode=args.mode, threshold=args.threshold)  # the steering value's rules, before the model loads
    adapter_path = adapter_dir(args.adapter) if args.adapter else None  # a bundled adapter by its name too
    check_adapter_dirs(args.model, [adapter_path] if adapter_path else [])  # before the model loads
    from reasonmaxxer.steering.adapters import load_adapter  # torch
    from reasonmaxxer.steering.request import Request, SteeringParams
    from reasonmaxxer.steering.sampling import SamplingParams

    model, tokenizer = models.load_model(args.model, dtype=args.dtype, device=args.device)
    # the server's numerics: the fast paths wherever they apply
    engine = build_engine(EngineConfig(args.model, args.dtype, args.device, fast=None), model, tokenizer)
    adapter = None
    if adapter_path:
        adapter = load_adapter(adapter_path)
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
