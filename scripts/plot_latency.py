#!/usr/bin/env python3
"""Plots end-of-speech → first-audio latency against concurrency from `atlas-voice loadtest
--json` lines (one run per line) into an SVG, with no dependencies beyond Python.

Usage: scripts/plot_latency.py docs/data/latency-20ms-chunks-v2.jsonl docs/latency.svg
Where a concurrency was run more than once, the run with the largest p99 is plotted.
"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
# Several runs at the same concurrency: plot the worst of them (largest p99).
worst = {}
for r in rows:
    k = r["sessions"]
    if k not in worst or r["voice_to_voice_ms"]["p99"] > worst[k]["voice_to_voice_ms"]["p99"]:
        worst[k] = r
rows = sorted(worst.values(), key=lambda r: r["sessions"])
W, H, L, R, T, B = 720, 420, 70, 20, 30, 50
xs = [r["sessions"] for r in rows]
series = {
    "p50": [r["voice_to_voice_ms"]["p50"] for r in rows],
    "p95": [r["voice_to_voice_ms"]["p95"] for r in rows],
    "p99": [r["voice_to_voice_ms"]["p99"] for r in rows],
}
floor = rows[0]["fakes_floor_ms"]
ymax = max(max(v) for v in series.values()) * 1.08
ymin = floor * 0.95
xmax = max(xs)


def px(x):
    return L + (W - L - R) * x / xmax


def py(y):
    return T + (H - T - B) * (1 - (y - ymin) / (ymax - ymin))


out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W/2}" y="18" text-anchor="middle" font-size="14">End of speech → first reply audio vs concurrent sessions (2 cores, 20 ms chunks)</text>']
for i in range(6):
    y = ymin + (ymax - ymin) * i / 5
    out.append(f'<line x1="{L}" x2="{W-R}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>')
    out.append(f'<text x="{L-6}" y="{py(y)+4:.1f}" text-anchor="end">{y:.0f} ms</text>')
for x in xs:
    out.append(f'<text x="{px(x):.1f}" y="{H-B+16}" text-anchor="middle">{x}</text>')
out.append(f'<text x="{(L+W-R)/2}" y="{H-12}" text-anchor="middle">concurrent sessions</text>')
out.append(f'<line x1="{L}" x2="{W-R}" y1="{py(floor):.1f}" y2="{py(floor):.1f}" stroke="#999" stroke-dasharray="4 4"/>')
out.append(f'<text x="{W-R}" y="{py(floor)-4:.1f}" text-anchor="end" fill="#666">fakes\' floor {floor:.0f} ms</text>')
colors = {"p50": "#2a4bbd", "p95": "#d98a1c", "p99": "#c0392b"}
for k, ys in series.items():
    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    out.append(f'<polyline fill="none" stroke="{colors[k]}" stroke-width="2" points="{pts}"/>')
    for x, y in zip(xs, ys):
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colors[k]}"/>')
for i, k in enumerate(series):
    out.append(f'<rect x="{L+10}" y="{T+10+i*18}" width="12" height="4" fill="{colors[k]}"/>')
    out.append(f'<text x="{L+28}" y="{T+16+i*18}">{k}</text>')
out.append("</svg>")
open(sys.argv[2], "w").write("\n".join(out))
