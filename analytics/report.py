"""``sluice stats --plot report.html``: cost per 1M tokens and p50/p95 latency by model and
priority, hour by hour, from the hourly rollup. One self-contained HTML file with inline SVG
charts (no script, no network, no plotting library), so it opens anywhere and can be mailed."""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from analytics.ddl import ROLLUP

__all__ = ["report_html", "report_sql"]

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
_W, _H, _PAD = 760, 260, 48


def report_sql(database: str, where: str = "1") -> str:
    return f"""
        SELECT
            hour,
            model,
            priority,
            sum(requests) AS requests,
            sum(input_tokens) + sum(output_tokens) AS tokens,
            sum(cost_usd) AS cost_usd,
            toInt64(quantilesExactMerge(0.5, 0.95)(latency)[1]) AS p50_ms,
            toInt64(quantilesExactMerge(0.5, 0.95)(latency)[2]) AS p95_ms
        FROM {database}.{ROLLUP} FINAL
        WHERE {where}
        GROUP BY hour, model, priority
        ORDER BY hour, model, priority
    """


Series = dict[str, list[tuple[datetime, float]]]


def _chart(title: str, unit: str, series: Series) -> str:
    points = [p for s in series.values() for p in s]
    if not points:
        return f"<h2>{html.escape(title)}</h2><p>No data yet.</p>"
    t0 = min(t for t, _ in points).timestamp()
    t1 = max(t for t, _ in points).timestamp()
    top = max(v for _, v in points) or 1.0
    span = (t1 - t0) or 3600.0

    def xy(t: datetime, v: float) -> tuple[float, float]:
        x = _PAD + (t.timestamp() - t0) / span * (_W - 2 * _PAD)
        y = _H - _PAD - v / top * (_H - 2 * _PAD)
        return x, y

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#444"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#444"/>',
        f'<text x="4" y="{_PAD - 8}" font-size="11">{top:.4g} {html.escape(unit)}</text>',
        f'<text x="{_PAD}" y="{_H - 8}" font-size="11">{datetime.fromtimestamp(t0):%Y-%m-%d %H:00}</text>',
        f'<text x="{_W - _PAD - 110}" y="{_H - 8}" font-size="11">{datetime.fromtimestamp(t1):%Y-%m-%d %H:00}</text>',
    ]
    legend = []
    for i, (name, pts) in enumerate(sorted(series.items())):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(t, v) for t, v in sorted(pts)))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in (xy(t, v) for t, v in pts)]
        legend.append(f'<span style="color:{color}">&#9632; {html.escape(name)}</span>')
    parts.append("</svg>")
    return f"<h2>{html.escape(title)}</h2>{''.join(parts)}<p>{' &nbsp; '.join(legend)}</p>"


def report_html(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, generated: datetime) -> str:
    cost: Series = defaultdict(list)
    p50: Series = defaultdict(list)
    p95: Series = defaultdict(list)
    for row in rows:
        r = dict(zip(columns, row, strict=True))
        name = f"{r['model']} / {r['priority']}"
        # Rows from the query endpoint arrive as JSON: times as text, big integers possibly too.
        hour = r["hour"] if isinstance(r["hour"], datetime) else datetime.fromisoformat(str(r["hour"]))
        tokens, usd = float(r["tokens"]), float(r["cost_usd"])
        if tokens:
            cost[name].append((hour, usd / tokens * 1_000_000))
        p50[name].append((hour, float(r["p50_ms"]) / 1000))
        p95[name].append((hour, float(r["p95_ms"]) / 1000))
    body = "".join(
        [
            _chart("Cost per 1M tokens (USD), by model and priority", "USD", cost),
            _chart("p50 latency (s), by model and priority", "s", p50),
            _chart("p95 latency (s), by model and priority", "s", p95),
        ]
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Sluice report</title>"
        "<style>body{font-family:sans-serif;margin:2em}svg{background:#fafafa}</style></head><body>"
        f"<h1>Sluice: cost and latency by hour</h1><p>Generated {generated:%Y-%m-%d %H:%M} UTC from the hourly "
        f"rollup ({len(rows)} model/priority/hour rows).</p>{body}</body></html>"
    )
