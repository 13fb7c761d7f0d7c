"""The A/B report as one self-contained HTML file: plots are inline SVG, no script, no external URL.

Contract: `render(summary)` takes `aggregate(...)`'s dict and returns HTML with: pass@1 per arm with its
95% interval, pass@1 against fire rate across arms (the threshold sweep), the fire-rate histogram of each
steered arm (answers per bin, a count axis), the paired differences against base, the failure taxonomy (right /
wrong with a boxed answer / wrong without one / truncated, as stacked bars and table columns), and a few pairs
where the arms disagree, or, when every outcome agrees, where the gate changed the text (fired tokens marked).
Axes have round ticks that end just above the data; value labels sit beside the bars, clear of the intervals.
`text_table(summary)` is the per-arm table for a terminal, `markdown(summary)` for a write-up.
`plots(summary)` gives the same plots, `standalone(svg)` makes one an SVG file.
"""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["markdown", "nice_ticks", "plots", "reference_table", "render", "standalone", "text_table"]

W, H, PAD = 640, 260, 48
LABELS = 110  # room under the bars for the arms' names, written at a slant


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `top` (steps of 1, 2, 2.5 or 5 x 10^k; about `count` of them), so the
    axis ends just above the data instead of leaving a blank band."""
    top = max(top, 1e-9)
    raw = top / count
    scale = 10 ** math.floor(math.log10(raw))
    step = next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= raw)
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def _tick(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if v else "0"


def _bars(arms: dict[str, Any]) -> str:
    """pass@1 per arm with its 95% interval; the value is written beside the bar's top, clear of the interval."""
    names = list(arms)
    left = PAD + int(3.8 * max(len(n) for n in names))  # the first slanted name must fit on the left
    width = max(W, left + PAD + 64 * len(names))
    ticks = nice_ticks(min(1.0, max([0.0] + [a["ci95"][1] for a in arms.values()])))
    top = ticks[-1]
    step = (width - left - PAD) / max(1, len(names))
    y = lambda v: H - PAD - (H - 2 * PAD) * v / top  # noqa: E731
    parts = [f'<svg width="{width}" height="{H + LABELS + 40}" role="img" aria-label="pass@1 per arm">',
             f'<line x1="{left}" y1="{H - PAD}" x2="{width - PAD}" y2="{H - PAD}" stroke="#333"/>']
    for v in ticks:
        parts.append(f'<line x1="{left}" y1="{y(v):.1f}" x2="{width - PAD}" y2="{y(v):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 4}" y="{y(v) + 3:.1f}" font-size="9" text-anchor="end">{_tick(v)}</text>')
    if "base" in arms:  # the base's pass@1 across the plot
        yb = y(arms["base"]["pass_at_1"])
        parts.append(f'<line x1="{left}" y1="{yb:.1f}" x2="{width - PAD}" y2="{yb:.1f}" stroke="#999" '
                     'stroke-dasharray="4 3"/>')
    for i, name in enumerate(names):
        a, x = arms[name], left + i * step + step * 0.15
        fill = "#9e9e9e" if name == "base" else "#4c78a8"
        parts.append(f'<rect x="{x:.1f}" y="{y(a["pass_at_1"]):.1f}" width="{step * 0.7:.1f}" '
                     f'height="{H - PAD - y(a["pass_at_1"]):.1f}" fill="{fill}"/>')
        cx = x + step * 0.35
        parts.append(f'<line x1="{cx:.1f}" y1="{y(a["ci95"][0]):.1f}" x2="{cx:.1f}" y2="{y(a["ci95"][1]):.1f}" '
                     'stroke="#000" stroke-width="2"/>')
        parts.append(f'<text x="{cx:.1f}" y="{H - PAD + 12}" font-size="10" text-anchor="end" '
                     f'transform="rotate(-30 {cx:.1f} {H - PAD + 12})">{html.escape(name)}</text>')
        parts.append(f'<text class="value" x="{cx + 5:.1f}" y="{y(a["pass_at_1"]) - 3:.1f}" font-size="10" '
                     f'text-anchor="start">{a["pass_at_1"]:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _forest(arms: dict[str, Any]) -> str:
    """Each arm's paired difference against base with its 95% interval, and the McNemar p-value."""
    rows = [(n, a["vs_base"]) for n, a in arms.items() if "vs_base" in a]
    left, right, row = 300, 90, 22
    height = PAD + row * max(1, len(rows))
    span = max([0.05] + [abs(v) for _, vs in rows for v in vs["ci95"]]) * 1.1
    x = lambda v: left + (W - left - right) * (v + span) / (2 * span)  # noqa: E731
    parts = [f'<svg width="{W}" height="{height}" role="img" aria-label="difference against base">',
             f'<line x1="{x(0):.1f}" y1="8" x2="{x(0):.1f}" y2="{height - 24}" stroke="#999" stroke-dasharray="4 3"/>',
             f'<text x="{x(-span):.1f}" y="{height - 8}" font-size="9">{-span:+.2f}</text>',
             f'<text x="{x(span):.1f}" y="{height - 8}" font-size="9" text-anchor="end">{span:+.2f}</text>',
             f'<text x="{x(0):.1f}" y="{height - 8}" font-size="9" text-anchor="middle">0 (pass@1 minus base)</text>']
    for i, (name, vs) in enumerate(rows):
        yy = 18 + i * row
        color = "#54a24b" if vs["ci95"][0] > 0 else "#e45756" if vs["ci95"][1] < 0 else "#4c78a8"
        parts += [f'<text x="{left - 8}" y="{yy + 4}" font-size="10" text-anchor="end">{html.escape(name)}</text>',
                  f'<line x1="{x(vs["ci95"][0]):.1f}" y1="{yy}" x2="{x(vs["ci95"][1]):.1f}" y2="{yy}" '
                  f'stroke="{color}" stroke-width="2"/>',
                  f'<circle cx="{x(vs["diff"]):.1f}" cy="{yy}" r="4" fill="{color}"/>',
                  f'<text x="{W - right + 6}" y="{yy + 4}" font-size="10">{vs["diff"]:+.3f} p={vs["mcnemar_p"]:.2g}'
                  "</text>"]
    parts.append("</svg>")
    return "".join(parts)


def _clusters(points: list[tuple[float, float]], near: float = 14.0) -> list[tuple[float, float, list[int]]]:
    """Points (pixels) grouped when closer than `near`: (x, y, 1-based numbers), so each group gets one label."""
    groups: list[tuple[float, float, list[int]]] = []
    for i, (x, y) in enumerate(points, start=1):
        for gx, gy, members in groups:
            if abs(gx - x) < near and abs(gy - y) < near:
                members.append(i)
                break
        else:
            groups.append((x, y, [i]))
    return groups


def _scatter(arms: dict[str, Any]) -> str:
    """pass@1 against fire rate: numbered points (a threshold sweep reads left to right), legend below; points
    that nearly coincide share one label ("1, 2"), so no two labels overlap."""
    pts = sorted((a["fire_rate_mean"], a["pass_at_1"], n) for n, a in arms.items() if a["fire_rate_mean"] < 1)
    xt, yt = nice_ticks(max([0.0] + [p[0] for p in pts]), 4), nice_ticks(max([0.0] + [p[1] for p in pts]), 4)
    px = lambda v: PAD + (W - 2 * PAD) * v / xt[-1]  # noqa: E731
    py = lambda v: H - PAD - (H - 2 * PAD) * v / yt[-1]  # noqa: E731
    parts = [f'<svg width="{W}" height="{H + 14 * len(pts)}" role="img" aria-label="pass@1 against fire rate">',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
             f'<text x="{W / 2}" y="{H - PAD + 26}" font-size="11" text-anchor="middle">fire rate (arms that fire '
             'on every token are left out)</text>']
    parts += [f'<text x="{px(v):.1f}" y="{H - PAD + 12}" font-size="9" text-anchor="middle">{_tick(v)}</text>'
              for v in xt]
    parts += [f'<text x="{PAD - 4}" y="{py(v) + 3:.1f}" font-size="9" text-anchor="end">{_tick(v)}</text>' for v in yt]
    xy = [(px(fx), py(p)) for fx, p, _ in pts]
    for x, y in xy:
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#e45756"/>')
    for x, y, members in _clusters(xy):
        parts.append(f'<text class="point" x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="10">'
                     f'{", ".join(map(str, members))}</text>')
    for i, (fx, p, name) in enumerate(pts, start=1):
        parts.append(f'<text x="{PAD}" y="{H + 14 * (i - 1)}" font-size="10">{i}: {html.escape(name)}: pass@1 '
                     f'{p:.3f}, fire rate {fx:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram(name: str, counts: list[int], edges: list[float] | None = None) -> str:
    """Answers per fire-rate bin, with a count axis and the bins' edges as percentages."""
    edges = edges or [i / len(counts) for i in range(len(counts) + 1)]
    base, left, height = H // 2, PAD + 10, H // 2 - 20
    bw = (W - left - PAD) / len(counts)
    ticks = nice_ticks(max([1, *counts]), 4)
    ticks = [t for t in ticks if float(t).is_integer()] or [0, 1]
    y = lambda c: base - height * c / ticks[-1]  # noqa: E731
    label = f"fire rate histogram {html.escape(name)}"
    parts = [f'<svg width="{W}" height="{H // 2 + 34}" role="img" aria-label="{label}">',
             f'<line x1="{left}" y1="{base - height}" x2="{left}" y2="{base}" stroke="#333"/>']
    for t in ticks:
        parts.append(f'<text class="count" x="{left - 4}" y="{y(t) + 3:.1f}" font-size="9" text-anchor="end">'
                     f'{int(t)}</text>')
    for i, c in enumerate(counts):
        parts.append(f'<rect x="{left + i * bw:.1f}" y="{y(c):.1f}" width="{max(1.0, bw - 1):.1f}" '
                     f'height="{base - y(c):.1f}" fill="#72b7b2"><title>{edges[i]:.2%}-{edges[i + 1]:.2%}: {c}'
                     "</title></rect>")
    for i in range(0, len(edges), max(1, len(counts) // 5)):
        parts.append(f'<text x="{left + i * bw:.1f}" y="{base + 12}" font-size="9" text-anchor="middle">'
                     f'{edges[i]:.1%}</text>')
    parts.append(f'<text x="{left}" y="{base + 28}" font-size="10">{html.escape(name)}: answers (count) by fire rate '
                 "per answer</text>")
    parts.append("</svg>")
    return "".join(parts)


FAILURE_COLOURS = {"right": "#54a24b", "wrong_boxed": "#e45756", "wrong_unboxed": "#f58518", "truncated": "#b279a2"}


def _failures(arms: dict[str, Any]) -> str:
    """One stacked bar per arm: right, wrong with a boxed answer, wrong without one, truncated (shares of answers)."""
    names = list(arms)
    left, bar_h = PAD + int(6.5 * max(len(n) for n in names)), 22
    height = 30 + bar_h * len(names) + 8
    span = W - left - PAD
    parts = [f'<svg width="{W}" height="{height}" role="img" aria-label="failure taxonomy per arm">']
    for i, name in enumerate(names):
        shares = {"right": arms[name]["pass_at_1"], **arms[name].get("failures", {})}
        y, x = 30 + i * bar_h, float(left)
        parts.append(f'<text x="{left - 6}" y="{y + 14}" font-size="10" text-anchor="end">{html.escape(name)}</text>')
        for kind, share in shares.items():
            w = span * share
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h - 4}" '
                         f'fill="{FAILURE_COLOURS[kind]}"><title>{kind} {share:.3f}</title></rect>')
            if w > 28:
                parts.append(f'<text x="{x + w / 2:.1f}" y="{y + 13}" font-size="9" text-anchor="middle" '
                             f'fill="#fff">{share:.2f}</text>')
            x += w
    legend = {"right": "right", "wrong_boxed": "wrong, boxed", "wrong_unboxed": "wrong, no box",
              "truncated": "truncated"}
    for j, (kind, colour) in enumerate(FAILURE_COLOURS.items()):
        parts.append(f'<rect x="{PAD + j * 120}" y="8" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{PAD + j * 120 + 14}" y="17" font-size="10">{legend[kind]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _failure_cells(a: dict[str, Any]) -> list[str]:
    f = a.get("failures") or {}
    return [f"{f[k]:.3f}" if k in f else "-" for k in ("wrong_boxed", "wrong_unboxed", "truncated")]


def _vs_cells(vs: dict[str, Any] | None) -> tuple[str, str]:
    """A paired comparison's cells: difference [95% CI], McNemar p ("-" without one)."""
    if not vs:
        return "-", "-"
    return f'{vs["diff"]:+.3f} [{vs["ci95"][0]:+.3f}, {vs["ci95"][1]:+.3f}]', f'{vs["mcnemar_p"]:.3g}'


def _table(arms: dict[str, Any]) -> str:
    rows = ["<tr><th>arm</th><th>n</th><th>pass@1 [95% CI]</th><th>vs base [95% CI]</th><th>McNemar p</th>"
            "<th>fire rate</th><th>wrong, boxed</th><th>wrong, no box</th><th>truncated</th>"
            "<th>tokens/answer</th><th>tokens/s</th><th>latency p50/p90 (s)</th></tr>"]
    for name, a in arms.items():
        diff, p = _vs_cells(a.get("vs_base"))
        lat = a["latency_s"]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{a['n']}</td>"
                    f"<td>{a['pass_at_1']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]</td><td>{diff}</td>"
                    f"<td>{p}</td><td>{a['fire_rate_mean']:.3f}</td>"
                    + "".join(f"<td>{c}</td>" for c in _failure_cells(a)) + f"<td>{a['tokens_per_answer']:.1f}</td>"
                    f"<td>{a['tokens_per_s']:.1f}</td><td>{lat['p50']:.2f} / {lat['p90']:.2f}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def markdown(summary: dict[str, Any]) -> str:
    """The per-arm table as Markdown (for write-ups): pass@1, difference against base, McNemar p, fire rate."""
    lines = ["| arm | n | pass@1 [95% CI] | vs base [95% CI] | McNemar p | fire rate | wrong, boxed | wrong, no box "
             "| truncated | tokens/answer |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, a in summary["arms"].items():
        diff, p = _vs_cells(a.get("vs_base"))
        lines.append(f"| {name} | {a['n']} | {a['pass_at_1']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | "
                     f"{diff} | {p} | {a['fire_rate_mean']:.3f} | " + " | ".join(_failure_cells(a))
                     + f" | {a['tokens_per_answer']:.0f} |")
    return "\n".join(lines) + "\n"


def _marked(d: dict[str, Any]) -> str:
    """The steered answer with the tokens where the gate fired highlighted (plain text without a trace)."""
    pieces, fired = d.get("arm_pieces"), set(d.get("arm_fired_at") or [])
    if not pieces:
        return html.escape(d["arm_text"])
    return "".join(f"<mark title='gate fired'>{html.escape(p)}</mark>" if i in fired else html.escape(p)
                   for i, p in enumerate(pieces))


def _pair(d: dict[str, Any]) -> str:
    return (f"<details><summary>{html.escape(d['problem_id'])} (sample {d['sample']}): base {d['base_reward']:.0f}, "
            f"{html.escape(d['arm'])} {d['arm_reward']:.0f}; gold {html.escape(str(d['gold']))}</summary>"
            f"<div class='pair'><pre>{html.escape(d['base_text'])}</pre><pre>{_marked(d)}</pre></div></details>")


def _pairs(summary: dict[str, Any]) -> str:
    """The answers where the outcomes differ; when none do, those where the gate changed the text anyway."""
    if summary.get("disagreements"):
        return "".join(_pair(d) for d in summary["disagreements"])
    if summary.get("differences"):
        return ("<p>Every pair has the same outcome. Where an arm's text differs from base's all the same (base "
                "left, the arm right, tokens where the gate fired highlighted):</p>"
                + "".join(_pair(d) for d in summary["differences"]))
    return "<p>none: every arm wrote the same text as base</p>"


def text_table(summary: dict[str, Any]) -> str:
    """The per-arm table as aligned plain text, for the terminal."""
    head = ["arm", "n", "pass@1 [95% CI]", "vs base [95% CI]", "McNemar p", "fire rate", "truncated"]
    rows = [head]
    for name, a in summary["arms"].items():
        rows.append([name, str(a["n"]), f"{a['pass_at_1']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]",
                     *_vs_cells(a.get("vs_base")), f"{a['fire_rate_mean']:.2%}",
                     f"{(a.get('failures') or {}).get('truncated', 0.0):.1%}"])
    return _aligned(rows)


def _aligned(rows: list[list[str]]) -> str:
    """Rows (the first a header) as aligned plain text: the first column left, the rest right, a rule under the
    header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]]) + "\n"


def reference_table(pairs: dict[str, dict[str, Any]], reference: str, as_markdown: bool = False) -> str:
    """`ab.against`'s result as a table: one row per arm, its paired difference against `reference`."""
    head = ["arm", "pairs", f"vs {reference} [95% CI]", "McNemar p", "fixed / broken"]
    rows = [[name, str(p["pairs"]), *_vs_cells(p), f"{p['fixed']} / {p['broken']}"] for name, p in pairs.items()]
    if not as_markdown:
        return _aligned([head, *rows])
    lines = [head, ["---"] + ["---:"] * (len(head) - 1), *rows]
    return "".join("| " + " | ".join(r) + " |\n" for r in lines)


def plots(summary: dict[str, Any]) -> dict[str, str]:
    """The report's plots as inline SVG, by file stem (`ab` writes each through `standalone` to OUTDIR/plots/)."""
    arms = summary["arms"]
    out = {"pass_at_1": _bars(arms), "vs_base": _forest(arms), "pass_vs_fire_rate": _scatter(arms),
           "failures": _failures(arms)}
    for n, a in arms.items():
        if a["mode"] != "off":
            out["fire_rate_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in n)] = _histogram(
                n, a["fire_rate_histogram"], a.get("fire_rate_bins"))
    return out


def standalone(svg: str) -> str:
    """An inline SVG of `plots` as an SVG file (with its namespace)."""
    return svg.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)


def render(summary: dict[str, Any], title: str = "ReasonMaxxer A/B") -> str:
    arms = summary["arms"]
    svg = plots(summary)
    hists = "".join(v for k, v in svg.items() if k.startswith("fire_rate_"))
    disagreements = _pairs(summary)
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}.pair{display:flex;gap:1em}"
             "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;flex:1;font-size:12px}"
             "mark{background:#ffd54f}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{_table(arms)}"
            f"<h2>pass@1 per arm (95% CI; dashed: base)</h2>{svg['pass_at_1']}"
            f"<h2>Paired difference against base (95% CI, exact McNemar p)</h2>{svg['vs_base']}"
            f"<h2>pass@1 against fire rate</h2>{svg['pass_vs_fire_rate']}"
            f"<h2>How answers fail (share of all answers)</h2>{svg['failures']}"
            f"<h2>Fire rate per answer</h2>{hists}<h2>Where the arms disagree</h2>{disagreements}"
            "</body></html>")
