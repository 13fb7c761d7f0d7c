"""`reasonmaxxer ab`: compare arms (base, adapters gated / always, a threshold sweep) on held-out problems.

Contract: `add_arguments(parser)` adds the flags; `main(args)` checks everything it can before writing anything
(the server answers, every arm's adapter is served, the problem file has the preset's fields), then runs
`ab.run_ab` (resumable), and writes OUTDIR/ab.json and OUTDIR/report.html. With `--model` it starts
`reasonmaxxer serve` itself on a free local port and stops it at the end. `write_report(records, arms, ...)`
writes and prints the report (ab-report too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from reasonmaxxer.training.problems import load_problems
from reasonmaxxer.training.verifier import Verifier

from . import ab
from .report import markdown, text_table

__all__ = ["add_arguments", "default_arms", "main", "served_models", "write_report"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.description = ("Send the same prompts with the same seeds to every arm (paired samples), score the answers, and "
                     "report pass@1, the paired difference against base with McNemar's test, fire rates and failure "
                     "kinds: a table at the end, OUT/ab.json and OUT/report.html.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server (ours, or any OpenAI-compatible one for a base arm)")
    where.add_argument("--model", metavar="NAME", help="start a server on this model (known name, folder or hub id)")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                   help="with --model: adapter directories to serve (repeatable) (default: the model's bundled one)")
    p.add_argument("--device", default=None, help="with --model: the server's torch device (cpu, cuda, ...) "
                   "(default: the server's, auto)")
    p.add_argument("--api-key", default="none", metavar="KEY", help="the server's API key")
    p.add_argument("--served-model", default=None, metavar="ID",
                   help="model id to send (default: the server's base model)")
    p.add_argument("--problems", required=True, metavar="FILE", help="JSONL file of held-out problems")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="gsm8k, svamp, math500, ... (default: from the path, else plain question/answer fields)")
    p.add_argument("--question-field", default=None, metavar="FIELD", help="question field(s) (default: the preset's)")
    p.add_argument("--answer-field", default=None, metavar="FIELD", help="gold answer field (default: the preset's)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="how many problems (default: all)")
    p.add_argument("--offset", type=int, default=0, metavar="I", help="first problem")
    p.add_argument("--samples", type=int, default=1, metavar="K", help="samples per problem and arm")
    p.add_argument("--arms", default=None, metavar="LIST",
                   help="base,ADAPTER:gated[@TAU],ADAPTER:always,ADAPTER:random[@RATE],... (default: base and "
                        "ADAPTER:gated for every adapter the server serves)")
    p.add_argument("--thresholds", default="", metavar="TAUS",
                   help="threshold sweep for each gated arm, e.g. 1.0,1.4,1.8 (default: none)")
    p.add_argument("--max-tokens", type=int, default=384, metavar="N", help="completion budget per answer")
    p.add_argument("--max-new-tokens", dest="max_tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--temperature", type=float, default=0.6, metavar="T", help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus mass")
    p.add_argument("--seed", type=int, default=0, help="base seed; a sample's seed derives from it, the row and the "
                   "sample index (the same for every arm)")
    p.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                   help="seconds one request may take (a slow CPU server with many in flight needs long)")
    p.add_argument("--verifier-fallbacks", default="boxed", metavar="LIST",
                   help="answer extractors tried in order: boxed, gsm8k, answer_is, last_number")
    p.add_argument("--prompt-style", default="chat", choices=["chat", "paper"],
                   help="chat: the chat route with the boxed instruction; paper: the paper's raw prompt on the "
                        "completions route, stops Human: / Assistant: (use the style the adapter was fitted with)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (resumed if it holds the same run)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(args):
    if args.url:
        yield args.url
        return
    port = _free_port()
    cmd = [sys.executable, "-m", "reasonmaxxer.cli", "serve", "--model", args.model, "--port", str(port),
           "--log-level", "warning"] + [x for a in args.adapter for x in ("--adapter", a)]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode}; see its messages above")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError("the server did not become healthy within 10 minutes")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


def served_models(client) -> tuple[list[str], list[str]]:
    """(base model ids, adapter ids) the server lists; ours mark an adapter with its `parent` (the base)."""
    models = list(client.openai.models.list())
    adapters = [m.id for m in models if (m.model_extra or {}).get("parent")]
    return [m.id for m in models if m.id not in adapters], adapters


def default_arms(adapters: list[str]) -> str:
    """What `ab` compares without --arms: base, and every served adapter at its own gate."""
    return ",".join(["base", *(f"{a}:gated" for a in adapters)])


def _arms_for(args, adapters: list[str]):
    spec = args.arms or default_arms(adapters)
    arms = ab.parse_arms(spec, [float(t) for t in args.thresholds.split(",") if t.strip()])
    if not args.arms:
        print(f"arms (no --arms given: base and every served adapter, gated): {', '.join(a.name for a in arms)}",
              file=sys.stderr)
    if len(arms) == 1:
        print("WARNING: only one arm, so nothing is compared: serve an adapter (serve --adapter DIR) or pass "
              "--arms base,ADAPTER:gated,...", file=sys.stderr)
    elif not any(a.name == "base" for a in arms):
        print("WARNING: no base arm: the paired differences and McNemar tests are against base; add base to --arms",
              file=sys.stderr)
    return arms


def main(args: argparse.Namespace) -> int:
    """Check, (start a server,) sample every arm, report; Ctrl-C keeps the answers so far (exit 130)."""
    import openai  # the HTTP client and its models: only when a server is asked

    from .client import SteeringClient

    if args.url and (args.adapter or args.device):
        raise ValueError("--adapter and --device configure the server that --model starts: with --url, the running "
                         "server already has its adapters (leave them out, or use --model instead)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file: give a folder for ab.json, report.html and the samples")
    if args.arms:  # a malformed --arms is refused before a server is asked or started
        ab.parse_arms(args.arms, [float(t) for t in args.thresholds.split(",") if t.strip()])
    problems = load_problems(args.problems, preset=args.preset, question_field=args.question_field,
                             answer_field=args.answer_field, offset=args.offset, limit=args.limit)
    with _server(args) as url:
        client = SteeringClient(url, api_key=args.api_key, timeout=args.timeout, max_retries=0)
        try:
            bases, adapters = served_models(client)
        except openai.APIConnectionError as e:
            raise RuntimeError(f"cannot reach a server at {url}: is it running, and is the URL right?") from e
        arms = _arms_for(args, adapters)
        missing = sorted({a.adapter for a in arms if a.adapter} - set(bases + adapters))
        if missing:
            raise ValueError(f"the server at {url} does not serve adapter(s) {missing}; it serves {bases + adapters}")
        model = args.served_model or bases[0]
        config = ab.AbConfig(samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, concurrency=args.concurrency,
                          prompt_style=args.prompt_style)
        fallbacks = tuple(x.strip() for x in args.verifier_fallbacks.split(",") if x.strip())
        try:
            with Verifier(fallbacks=fallbacks) as verifier:
                records = ab.run_ab(client, model, problems, arms, config, args.out, verifier.score)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(ab.load_samples(args.out))} answers are kept in {args.out}; run the same "
                  "command to resume (`reasonmaxxer ab-report` reports what is there)", file=sys.stderr)
            return 130
    write_report(records, arms, model, problems.selection, args.out)
    return 0


def write_report(records, arms, model: str, selection: dict, out: str | Path, style: str = "text") -> None:
    """Write ab.json, report.html and the plots of an ab folder's `records`; print the per-arm table (`style`:
    text, markdown) or JSON."""
    summary = ab.aggregate(records, arms)
    summary["problems"] = {k: selection.get(k) for k in ("path", "preset", "offset", "limit", "count")}
    ab.write_outputs(summary, out, title=f"ReasonMaxxer A/B: {model} on {Path(str(selection.get('path'))).name}")
    if style == "markdown":
        print(markdown(summary), end="")
        return
    if style == "json":
        print(json.dumps({n: {k: a[k] for k in ("n", "pass_at_1", "ci95", "fire_rate_mean", "failures")} |
                          ({"vs_base": a["vs_base"]} if "vs_base" in a else {}) for n, a in summary["arms"].items()},
                         indent=2))
        return
    print(text_table(summary), end="")
    print(f"wrote {Path(out) / 'ab.json'}, {Path(out) / 'report.html'} and {Path(out) / 'plots'}/")
