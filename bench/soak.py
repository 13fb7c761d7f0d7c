"""Soak test of a running server: concurrent streaming clients for a while, some sending bad requests, then
the clients' own tallies against the server's /metrics.

    python bench/soak.py --url http://127.0.0.1:8000 [--streams 32] [--duration 120] [--bad-fraction 0.1]
                         [--max-tokens 32] [--api-key KEY] [--seed 0] [--json]
                         [--pid SERVER_PID [--rss-every 60] [--plot rss.svg]]

`--streams` client loops run for `--duration` seconds (a request under way when time is up is finished, not
cut). Each request is a streaming chat or text completion (`stream: true`, `stream_options.include_usage`)
on the base model or an adapter, with or without a `steering` override; about `--bad-fraction` of them are
bad (malformed JSON, out-of-range token ids, wrong types, an unknown model, bad steering) and must be refused.
The clients record the status codes, and for every good request whether its stream ended with
`data: [DONE]`, its usage chunk's `completion_tokens` and `steering.gate_fired`. Before and after the run
/metrics is scraped, and the deltas of `reasonmaxxer_generated_tokens_total`,
`reasonmaxxer_gate_fired_tokens_total` and `reasonmaxxer_responses_total{status}` are compared with the
clients' sums (the first scrape's own 200 is counted by the server after it answers, so one 200 is added).
The server must have no other clients meanwhile. A progress line goes to stderr every 10 s.
With `--pid` (the server's process, on this machine) its resident memory is sampled every `--rss-every`
seconds from /proc (at the start, then each interval, then at the end): the series, its start / peak / end,
and the growth over the second half of the run in MB per hour (a plateau reads near 0) go into the report;
`--plot FILE` draws the curve as an SVG. Memory is reported, not asserted.

Contract: it prints a summary table (or, with `--json`, one JSON object of every figure) and exits 1 if any
response was a 5xx, any good request's stream lacked `data: [DONE]` or its usage chunk, any request failed
in transport, or the metrics disagree with the clients' sums; 0 otherwise. Nothing else is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from machine import describe, header

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in total?",
    "Weng earns $12 an hour for babysitting. She did 50 minutes yesterday. How much did she earn?",
    "If 3x + 5 = 20, what is x? Solve step by step.",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
]
METRICS = ("reasonmaxxer_generated_tokens_total", "reasonmaxxer_gate_fired_tokens_total")


@dataclass
class Tally:
    """What the clients saw; every figure but `latencies` goes into the report."""

    statuses: Counter = field(default_factory=Counter)  # "200", "400", ..., or "error:ReadTimeout"
    good: int = 0
    bad: int = 0
    bad_kinds: Counter = field(default_factory=Counter)
    bad_accepted: int = 0  # bad requests answered 2xx (their streams' tokens are still summed)
    good_without_done: int = 0
    good_without_usage: int = 0
    completion_tokens: int = 0  # from the usage chunks of every 200 stream
    gate_fired: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, good requests answered 200

    @property
    def requests(self) -> int:
        return self.good + self.bad


# -- requests ------------------------------------------------------------------------------------------------
def good_request(rng: random.Random, base: str, adapters: list[str], max_tokens: int) -> tuple[str, dict]:
    """A valid streaming request: chat or completion, base or adapter model, sometimes a steering override."""
    model = rng.choice([base, *adapters])
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, max_tokens), "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": rng.choice([0.0, 0.7, 1.0]),
                            "seed": rng.randrange(2**31), "n": rng.choice([1, 1, 1, 2]),
                            "ignore_eos": rng.random() < 0.5}
    if adapters:
        if model == base:
            a = rng.choice(adapters)
            steering = rng.choice([None, {"adapter": a}, {"adapter": a, "mode": "always"}])
        else:
            steering = rng.choice([None, {"mode": "always"}, {"mode": "off"}, {"threshold": 2.5}])
        if steering is not None:
            body["steering"] = steering
    text = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}
    return "/v1/completions", {**body, "prompt": text}


def bad_request(rng: random.Random, base: str) -> tuple[str, str, bytes]:
    """(kind, path, raw body) of a request the server must refuse with a 4xx."""
    stream = {"stream": True, "stream_options": {"include_usage": True}, "max_tokens": 4}
    ok = {"model": base, "prompt": "x", **stream}
    chat = {"model": base, "messages": [{"role": "user", "content": "x"}], **stream}
    c, cc = "/v1/completions", "/v1/chat/completions"
    kinds = {
        "malformed-json": (rng.choice([c, cc]), rng.choice([b'{"model": "' + base.encode() + b'", "prompt": "x"',
                                                            b"{not json", b""])),
        "token-ids": (c, {**ok, "prompt": rng.choice([[10**9], [-1], [1, 2, 10**12], [[3, -5]]])}),
        "wrong-type": rng.choice([(c, {**ok, "max_tokens": "many"}), (c, {**ok, "prompt": {"text": "x"}}),
                                  (cc, {**chat, "temperature": "hot"}), (cc, {**chat, "messages": "x"}),
                                  (cc, {**chat, "n": [2]})]),
        "unknown-model": (rng.choice([c, cc]), {**rng.choice([ok, chat]), "model": f"no-such-{rng.randrange(99)}"}),
        "bad-steering": (c, {**ok, "steering": rng.choice([{"mode": "sometimes"}, {"adapter": "no-such-adapter"},
                                                            {"threshold": -1}, {"treshold": 1}, {"top_k": 0}])}),
    }
    kind = rng.choice(sorted(kinds))
    path, body = kinds[kind]
    return kind, path, body if isinstance(body, bytes) else json.dumps(body).encode()


async def read_stream(response: httpx.Response) -> tuple[bool, dict | None]:
    """(the last event was `data: [DONE]`, the usage object of the usage chunk or None)."""
    done, usage = False, None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        done = data == "[DONE]"
        if not done:
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
    return done, usage


async def send(client: httpx.AsyncClient, path: str, raw: bytes, good: bool, tally: Tally) -> None:
    """Send one request and record what came back."""
    start = time.perf_counter()
    try:
        async with client.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
            tally.statuses[str(r.status_code)] += 1
            if r.status_code != 200:
                await r.aread()
                tally.good_without_done += good
                return
            done, usage = await read_stream(r)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        tally.statuses[f"error:{type(e).__name__}"] += 1
        tally.good_without_done += good
        return
    if usage is not None:
        tally.completion_tokens += usage.get("completion_tokens", 0)
        tally.gate_fired += (usage.get("steering") or {}).get("gate_fired", 0)
    if good:
        tally.good_without_done += not done
        tally.good_without_usage += usage is None
        tally.latencies.append(time.perf_counter() - start)
    else:
        tally.bad_accepted += 1


async def client_loop(client, rng: random.Random, end: float, models: tuple[str, list[str]], bad_fraction: float,
                      max_tokens: int, tally: Tally) -> None:
    base, adapters = models
    while time.monotonic() < end:
        if rng.random() < bad_fraction:
            kind, path, raw = bad_request(rng, base)
            tally.bad += 1
            tally.bad_kinds[kind] += 1
            await send(client, path, raw, False, tally)
        else:
            path, body = good_request(rng, base, adapters, max_tokens)
            tally.good += 1
            await send(client, path, json.dumps(body).encode(), True, tally)


# -- metrics -------------------------------------------------------------------------------------------------
async def scrape(client: httpx.AsyncClient) -> dict[str, Any]:
    """The counters this soak compares: token sums over all labels, responses by status."""
    from prometheus_client.parser import text_string_to_metric_families

    r = await client.get("/metrics")
    r.raise_for_status()
    out: dict[str, Any] = {name: 0.0 for name in METRICS}
    out["responses"] = Counter()
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name in METRICS:
                out[s.name] += s.value
            elif s.name == "reasonmaxxer_responses_total":
                out["responses"][s.labels["status"]] += int(s.value)
    return out


def compare(before: dict, after: dict, tally: Tally) -> dict[str, Any]:
    """Server deltas next to the clients' sums; `agree` is True when all three match exactly."""
    generated = after[METRICS[0]] - before[METRICS[0]]
    fired = after[METRICS[1]] - before[METRICS[1]]
    responses = after["responses"] - before["responses"]  # Counter subtraction drops zeros
    expected = Counter({k: v for k, v in tally.statuses.items() if not k.startswith("error:")})
    expected["200"] += 1  # the first scrape, counted once it was answered
    return {
        "server_generated_tokens": int(generated), "client_completion_tokens": tally.completion_tokens,
        "server_gate_fired_tokens": int(fired), "client_gate_fired": tally.gate_fired,
        "server_responses": dict(sorted(responses.items())), "client_responses": dict(sorted(expected.items())),
        "agree": generated == tally.completion_tokens and fired == tally.gate_fired and responses == expected,
    }


# -- the run -------------------------------------------------------------------------------------------------
async def discover(client: httpx.AsyncClient) -> tuple[str, list[str]]:
    """(base model id, adapter ids) from /v1/models: the first entry is the base, the rest its adapters."""
    r = await client.get("/v1/models")
    r.raise_for_status()
    ids = [m["id"] for m in r.json()["data"]]
    return ids[0], ids[1:]


async def progress(tally: Tally, start: float, every: float, log) -> None:
    while True:
        await asyncio.sleep(every)
        t = time.monotonic() - start
        fivexx = sum(v for k, v in tally.statuses.items() if k.startswith("5"))
        print(f"[{t:5.0f}s] {tally.requests} requests ({tally.requests / t:.1f}/s), 5xx {fivexx}, good {tally.good} "
              f"(no [DONE] {tally.good_without_done}), bad {tally.bad}, tokens {tally.completion_tokens} "
              f"({tally.completion_tokens / t:.0f}/s), gate fired {tally.gate_fired}", file=log, flush=True)


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` in MB (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"/proc/{pid}/status has no VmRSS line")


async def sample_rss(pid: int, every: float, start: float, series: list[tuple[float, float]], log) -> None:
    """Append (seconds since start, MB) every `every` seconds until cancelled."""
    while True:
        series.append((round(time.monotonic() - start, 1), round(rss_mb(pid), 1)))
        print(f"[{series[-1][0]:5.0f}s] server RSS {series[-1][1]:.0f} MB", file=log, flush=True)
        await asyncio.sleep(every)


def rss_summary(series: list[tuple[float, float]]) -> dict[str, Any]:
    """Start, peak and end of the series, and the least-squares slope over its second half in MB per hour."""
    if not series:
        return {}
    half = [p for p in series if p[0] >= series[-1][0] / 2]
    slope = None
    if len(half) >= 2:
        mt, mr = statistics.fmean(t for t, _ in half), statistics.fmean(r for _, r in half)
        var = sum((t - mt) ** 2 for t, _ in half)
        slope = round(sum((t - mt) * (r - mr) for t, r in half) / var * 3600, 1) if var else None
    return {"rss_mb": [list(p) for p in series], "rss_start_mb": series[0][1],
            "rss_peak_mb": max(r for _, r in series), "rss_end_mb": series[-1][1],
            "rss_second_half_mb_per_hour": slope}


def plot_rss(series: list[tuple[float, float]], path: str, title: str) -> None:
    """The RSS curve as a small SVG (no plotting library needed): minutes across, MB up."""
    w, h, pad = 640, 320, 48
    t_max = max(t for t, _ in series) or 1.0
    r_max = max(r for _, r in series) * 1.1 or 1.0
    x = lambda t: pad + (w - 2 * pad) * t / t_max  # noqa: E731
    y = lambda r: h - pad - (h - 2 * pad) * r / r_max  # noqa: E731
    points = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r in series)
    ticks = []
    for i in range(5):
        r = r_max * i / 4
        ticks.append(f'<line x1="{pad}" x2="{w - pad}" y1="{y(r):.1f}" y2="{y(r):.1f}" stroke="#ddd"/>'
                     f'<text x="{pad - 6}" y="{y(r) + 4:.1f}" text-anchor="end">{r:.0f}</text>')
        t = t_max * i / 4
        ticks.append(f'<text x="{x(t):.1f}" y="{h - pad + 16}" text-anchor="middle">{t / 60:.0f}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11">\n<rect width="{w}" height="{h}" fill="white"/>\n{"".join(ticks)}\n'
           f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>\n'
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>\n'
           f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">minutes</text>\n'
           f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">RSS (MB)</text>\n'
           "</svg>\n")
    with open(path, "w") as f:
        f.write(svg)


async def soak(url: str, streams: int = 32, duration: float = 120.0, bad_fraction: float = 0.1,
               max_tokens: int = 32, api_key: str | None = None, seed: int = 0, progress_every: float = 10.0,
               log=sys.stderr, pid: int | None = None, rss_every: float = 60.0) -> dict[str, Any]:
    """Run the soak against `url` and return every figure (see `report`); with `pid`, the server's RSS too."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=streams + 2, max_keepalive_connections=streams + 2)
    timeout = httpx.Timeout(300.0, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as client:
        models = await discover(client)
        before = await scrape(client)
        tally, start = Tally(), time.monotonic()
        series: list[tuple[float, float]] = []
        tickers = [asyncio.create_task(progress(tally, start, progress_every, log))]
        if pid is not None:
            tickers.append(asyncio.create_task(sample_rss(pid, rss_every, start, series, log)))
        loops = [client_loop(client, random.Random(seed * 1_000_003 + i), start + duration, models, bad_fraction,
                             max_tokens, tally) for i in range(streams)]
        try:
            await asyncio.gather(*loops)
        finally:
            for t in tickers:
                t.cancel()
        wall = time.monotonic() - start
        if pid is not None:
            series.append((round(wall, 1), round(rss_mb(pid), 1)))
        after = await scrape(client)
    return {**report(tally, compare(before, after, tally), wall, streams, models), **rss_summary(series),
            "client_machine": describe()}


def report(tally: Tally, metrics: dict[str, Any], wall: float, streams: int, models) -> dict[str, Any]:
    """Every figure of the run, the failures (reasons for exit status 1) among them."""
    fivexx = sum(v for k, v in tally.statuses.items() if k.startswith("5"))
    errors = sum(v for k, v in tally.statuses.items() if k.startswith("error:"))
    lat = sorted(tally.latencies)
    figures = {k: v for k, v in asdict(tally).items() if k != "latencies"}
    figures.update(
        model=models[0], adapters=models[1], streams=streams, wall_s=round(wall, 1), requests=tally.requests,
        statuses=dict(sorted(tally.statuses.items())), bad_kinds=dict(sorted(tally.bad_kinds.items())),
        fivexx=fivexx, transport_errors=errors, requests_per_s=round(tally.requests / wall, 2),
        tokens_per_s=round(tally.completion_tokens / wall, 1),
        fire_rate=round(tally.gate_fired / tally.completion_tokens, 4) if tally.completion_tokens else 0.0,
        bad_fraction=round(tally.bad / tally.requests, 4) if tally.requests else 0.0,
        latency_p50_s=round(statistics.median(lat), 3) if lat else None,
        latency_p95_s=round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        latency_max_s=round(lat[-1], 3) if lat else None, metrics=metrics,
    )
    checks = {"5xx responses": fivexx, "good requests without [DONE]": tally.good_without_done,
              "good requests without usage": tally.good_without_usage, "transport errors": errors,
              "metrics disagree": not metrics["agree"]}
    failures = [name for name, count in checks.items() if count]
    figures["failures"] = failures
    return figures


def print_summary(f: dict[str, Any], out=sys.stdout) -> None:
    m = f["metrics"]
    rows = [
        ("client machine", header(f["client_machine"]).removeprefix("machine: ")),
        ("model (adapters)", f"{f['model']} ({', '.join(f['adapters']) or 'none'})"),
        ("streams, wall", f"{f['streams']}, {f['wall_s']} s"),
        ("requests (good / bad)", f"{f['requests']} ({f['good']} / {f['bad']}; bad fraction {f['bad_fraction']})"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in f["statuses"].items())),
        ("5xx, transport errors", f"{f['fivexx']}, {f['transport_errors']}"),
        ("good without [DONE] / usage", f"{f['good_without_done']} / {f['good_without_usage']}"),
        ("bad accepted (2xx)", f"{f['bad_accepted']}"),
        ("requests/s, tokens/s", f"{f['requests_per_s']}, {f['tokens_per_s']}"),
        ("latency p50 / p95 / max", f"{f['latency_p50_s']} / {f['latency_p95_s']} / {f['latency_max_s']} s"),
        ("tokens server / client", f"{m['server_generated_tokens']} / {m['client_completion_tokens']}"),
        ("gate fired server / client", f"{m['server_gate_fired_tokens']} / {m['client_gate_fired']} "
                                       f"(fire rate {f['fire_rate']})"),
        ("responses server", json.dumps(m["server_responses"])),
        ("responses client (+1 scrape)", json.dumps(m["client_responses"])),
    ]
    if "rss_start_mb" in f:
        rows.append(("server RSS start / peak / end", f"{f['rss_start_mb']:.0f} / {f['rss_peak_mb']:.0f} / "
                     f"{f['rss_end_mb']:.0f} MB; second half {f['rss_second_half_mb_per_hour']} MB/h"))
    rows.append(("result", "OK" if not f["failures"] else "FAIL: " + "; ".join(f["failures"])))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--streams", type=int, default=32, help="concurrent client loops")
    p.add_argument("--duration", type=float, default=120.0, help="seconds to keep sending")
    p.add_argument("--bad-fraction", type=float, default=0.1, help="share of requests that are bad")
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a good request")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object of every figure")
    p.add_argument("--pid", type=int, default=None, help="the server's process id: sample its resident memory")
    p.add_argument("--rss-every", type=float, default=60.0, help="seconds between RSS samples (with --pid)")
    p.add_argument("--plot", default=None, metavar="FILE", help="draw the RSS curve into FILE (SVG; with --pid)")
    a = p.parse_args(argv)
    if a.plot and a.pid is None:
        p.error("--plot draws the server's RSS: give the server's process id with --pid")
    figures = asyncio.run(soak(a.url.rstrip("/"), a.streams, a.duration, a.bad_fraction, a.max_tokens, a.api_key,
                               a.seed, pid=a.pid, rss_every=a.rss_every))
    if a.plot:
        plot_rss([tuple(p) for p in figures["rss_mb"]], a.plot,
                 f"server RSS, {a.streams} clients, {a.bad_fraction:.0%} bad, {figures['wall_s'] / 60:.0f} min")
    if a.json:
        print(json.dumps(figures, indent=2))
    else:
        print_summary(figures)
    return 1 if figures["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
