"""`reasonmaxxer ab`: compare arms (base, adapters gated / always, a threshold sweep) on held-out problems.

Contract: checks everything it can before writing anything (the server answers, every arm's adapter is
served, the problem file has the preset's fields), then runs `ab.run_ab` (resumable), and writes
OUTDIR/ab.json and OUTDIR/report.html. With `--model` it starts `reasonmaxxer serve` itself on a free
local port and stops it at the end.
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

__all__ = ["add_command"]


def add_command(sub) -> None:
    p = sub.add_parser("ab", help="A/B comparison of steered against base on held-out problems",
                       description="Send the same prompts with the same seeds to every arm (paired samples), score "
                       "the answers, and report pass@1, the paired difference against base with McNemar's test, fire "
                       "rates and failure kinds: a table at the end, OUT/ab.json and OUT/report.html.")
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
    p.set_defaults(func=run_ab_command)

    p = sub.add_parser("ab-report", help="rewrite ab.json and report.html from an ab folder's samples (no server)")
    p.add_argument("out", help="an `ab --out` folder; an interrupted run is reported on the samples it has")
    p.add_argument("--markdown", action="store_true", help="print the per-arm table as Markdown")
    p.add_argument("--json", action="store_true", help="print the per-arm summary as JSON")
    p.add_argument("--arms", default=None, metavar="LIST",
                   help="report only these arms (names as in the folder), e.g. base,X:gated (default: all)")
    p.set_defaults(func=run_report_command)

    p = sub.add_parser("probe-report", help="summarise a probe-branches folder (also one still running)")
    p.add_argument("out", help="a `probe-branches --out` folder")
    p.set_defaults(func=lambda args: _probe_report(args.out))


def _probe_report(out: str) -> int:
    from .probe_report import write_summary

    write_summary(Path(out) / "branches.jsonl")
    return 0


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
    from .ab import parse_arms

    spec = args.arms or default_arms(adapters)
    arms = parse_arms(spec, [float(t) for t in args.thresholds.split(",") if t.strip()])
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


def run_ab_command(args) -> int:
    import openai

    from reasonmaxxer.training.problems import load_problems
    from reasonmaxxer.training.verifier import Verifier

    from .ab import AbConfig, parse_arms, run_ab
    from .client import SteeringClient

    if args.url and (args.adapter or args.device):
        raise ValueError("--adapter and --device configure the server that --model starts: with --url, the running "
                         "server already has its adapters (leave them out, or use --model instead)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file: give a folder for ab.json, report.html and the samples")
    if args.arms:  # a malformed --arms is refused before a server is asked or started
        parse_arms(args.arms, [float(t) for t in args.thresholds.split(",") if t.strip()])
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
        config = AbConfig(samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed, concurrency=args.concurrency,
                          prompt_style=args.prompt_style)
        fallbacks = tuple(x.strip() for x in args.verifier_fallbacks.split(",") if x.strip())
        try:
            with Verifier(fallbacks=fallbacks) as verifier:
                records = run_ab(client, model, problems, arms, config, args.out, verifier.score)
        except KeyboardInterrupt:
            from .ab import load_samples

            print(f"\ninterrupted: {len(load_samples(args.out))} answers are kept in {args.out}; run the same command "
                  "to resume (`reasonmaxxer ab-report` reports what is there)", file=sys.stderr)
            return 130
    _summarize(records, arms, model, problems.selection, args.out)
    return 0


def _summarize(records, arms, model: str, selection: dict, out: str | Path, style: str = "text") -> None:
    """Write ab.json, report.html and the plots; print the per-arm table (text, markdown) or JSON."""
    from .ab import aggregate, write_outputs
    from .report import markdown, text_table

    summary = aggregate(records, arms)
    summary["problems"] = {k: selection.get(k) for k in ("path", "preset", "offset", "limit", "count")}
    write_outputs(summary, out, title=f"ReasonMaxxer A/B: {model} on {Path(str(selection.get('path'))).name}")
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


def run_report_command(args) -> int:
    from .ab import Arm, load_samples

    out = Path(args.out)
    meta_path, samples = out / "meta.json", out / "samples.jsonl"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: give the --out folder of a `reasonmaxxer ab` run")
    meta = json.loads(meta_path.read_text())
    records = load_samples(out)
    if not records:
        raise ValueError(f"{samples} holds no samples yet: run `reasonmaxxer ab` first")
    arms = [Arm(**a) for a in meta["arms"]]
    if args.arms:
        wanted = [x.strip() for x in args.arms.split(",") if x.strip()]
        unknown = sorted(set(wanted) - {a.name for a in arms})
        if unknown:
            raise ValueError(f"{out} has no arm(s) {unknown}; it has {[a.name for a in arms]}")
        arms = [a for a in arms if a.name in wanted]
        records = [r for r in records if r["arm"] in wanted]
    keys = [{(r["problem_id"], r["sample"]) for r in records if r["arm"] == a.name} for a in arms]
    complete = set.intersection(*keys)  # an interrupted run: report only the samples every arm has
    kept = [r for r in records if (r["problem_id"], r["sample"]) in complete]
    if len(kept) < len(records):
        print(f"{len(records) - len(kept)} samples left out: not every arm has them "
              "(an interrupted run, or arms sampled on fewer problems)")
    if not kept:
        raise ValueError(f"no (problem, sample) in {samples} has been answered by every arm yet")
    records = kept
    style = "markdown" if args.markdown else "json" if args.json else "text"
    _summarize(records, arms, meta["model"], meta["problems"], out, style)
    return 0
