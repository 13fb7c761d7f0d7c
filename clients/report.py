"""The A/B report as one self-contained HTML file: plots are inline SVG, no script, no external URL.

Contract: `render(summary)` takes `aggregate(...)`'s dict and returns HTML with: pass@1 per arm with its
95% interval, pass@1 against fire rate across arms (the threshold sweep), the fire-rate histogram of each
steered arm, the paired differences against base, and a few problems where the arms disagree.
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["render"]

W, H, PAD = 640, 260, 48


def _bars(arms: dict[str, Any]) -> str:
    names = list(arms)
    top = max([1e-9] + [a["ci95"][1] for a in arms.values()])
    step = (W - 2 * PAD) / max(1, len(names))
    parts = [f'<svg width="{W}" height="{H}" role="img" aria-label="pass@1 per arm">',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>']
    y = lambda v: H - PAD - (H - 2 * PAD) * v / top  # noqa: E731
    for i, name in enumerate(names):
        a, x = arms[name], PAD + i * step + step * 0.15
        parts.append(f'<rect x="{x:.1f}" y="{y(a["pass_at_1"]):.1f}" width="{step * 0.7:.1f}" '
                     f'height="{H - PAD - y(a["pass_at_1"]):.1f}" fill="#4c78a8"/>')
        cx = x + step * 0.35
        parts.append(f'<line x1="{cx:.1f}" y1="{y(a["ci95"][0]):.1f}" x2="{cx:.1f}" y2="{y(a["ci95"][1]):.1f}" '
                     'stroke="#000" stroke-width="2"/>')
        parts.append(f'<text x="{cx:.1f}" y="{H - PAD + 14}" font-size="10" text-anchor="middle">'
                     f'{html.escape(name)}</text>')
        parts.append(f'<text x="{cx:.1f}" y="{y(a["ci95"][1]) - 4:.1f}" font-size="10" text-anchor="middle">'
                     f'{a["pass_at_1"]:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _scatter(arms: dict[str, Any]) -> str:
    pts = [(a["fire_rate_mean"], a["pass_at_1"], n) for n, a in arms.items()]
    xmax = max([1e-9] + [p[0] for p in pts]) * 1.1
    ymax = max([1e-9] + [p[1] for p in pts]) * 1.2
    parts = [f'<svg width="{W}" height="{H}" role="img" aria-label="pass@1 against fire rate">',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
             f'<text x="{W / 2}" y="{H - 8}" font-size="11" text-anchor="middle">fire rate</text>']
    for fx, py, name in pts:
        x = PAD + (W - 2 * PAD) * fx / xmax
        y = H - PAD - (H - 2 * PAD) * py / ymax
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#e45756"/>')
        parts.append(f'<text x="{x + 6:.1f}" y="{y - 6:.1f}" font-size="10">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram(name: str, counts: list[int]) -> str:
    top, bw = max([1, *counts]), (W - 2 * PAD) / len(counts)
    label = f"fire rate histogram {html.escape(name)}"
    parts = [f'<svg width="{W}" height="{H // 2 + 30}" role="img" aria-label="{label}">']
    base = H // 2
    for i, c in enumerate(counts):
        h = (base - 20) * c / top
        parts.append(f'<rect x="{PAD + i * bw:.1f}" y="{base - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                     'fill="#72b7b2"/>')
        parts.append(f'<text x="{PAD + i * bw + bw / 2:.1f}" y="{base + 14}" font-size="9" text-anchor="middle">'
                     f'{i / 10:.1f}</text>')
    parts.append(f'<text x="{PAD}" y="{base + 28}" font-size="10">{html.escape(name)}: fire rate per answer</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(arms: dict[str, Any]) -> str:
    rows = ["<tr><th>arm</th><th>n</th><th>pass@1 [95% CI]</th><th>vs base [95% CI]</th><th>McNemar p</th>"
            "<th>fire rate</th><th>tokens/answer</th><th>tokens/s</th><th>latency p50/p90 (s)</th></tr>"]
    for name, a in arms.items():
        vs = a.get("vs_base")
        diff = f'{vs["diff"]:+.3f} [{vs["ci95"][0]:+.3f}, {vs["ci95"][1]:+.3f}]' if vs else "-"
        p = f'{vs["mcnemar_p"]:.3g}' if vs else "-"
        lat = a["latency_s"]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{a['n']}</td>"
                    f"<td>{a['pass_at_1']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]</td><td>{diff}</td>"
                    f"<td>{p}</td><td>{a['fire_rate_mean']:.3f}</td><td>{a['tokens_per_answer']:.1f}</td>"
                    f"<td>{a['tokens_per_s']:.1f}</td><td>{lat['p50']:.2f} / {lat['p90']:.2f}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _marked(d: dict[str, Any]) -> str:
    """The steered answer with the tokens where the gate fired highlighted (plain text without a trace)."""
    pieces, fired = d.get("arm_pieces"), set(d.get("arm_fired_at") or [])
    if not pieces:
        return html.escape(d["arm_text"])
    return "".join(f"<mark title='gate fired'>{html.escape(p)}</mark>" if i in fired else html.escape(p)
                   for i, p in enumerate(pieces))


def render(summary: dict[str, Any], title: str = "ReasonMaxxer A/B") -> str:
    arms = summary["arms"]
    hists = "".join(_histogram(n, a["fire_rate_histogram"]) for n, a in arms.items() if a["mode"] != "off")
    disagreements = "".join(
        f"<details><summary>{html.escape(d['problem_id'])} (sample {d['sample']}): base {d['base_reward']:.0f}, "
        f"{html.escape(d['arm'])} {d['arm_reward']:.0f}; gold {html.escape(str(d['gold']))}</summary>"
        f"<div class='pair'><pre>{html.escape(d['base_text'])}</pre><pre>{_marked(d)}</pre></div>"
        "</details>" for d in summary.get("disagreements", []))
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}.pair{display:flex;gap:1em}"
             "pre{white-space:pre-wrap;background:#f6f6f6;padding:.5em;flex:1;font-size:12px}"
             "mark{background:#ffd54f}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{_table(arms)}"
            f"<h2>pass@1 per arm (95% CI)</h2>{_bars(arms)}<h2>pass@1 against fire rate</h2>{_scatter(arms)}"
            f"<h2>Fire rate per answer</h2>{hists}<h2>Where the arms disagree</h2>{disagreements or '<p>none</p>'}"
            "</body></html>")
