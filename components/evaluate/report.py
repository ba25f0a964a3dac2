"""A self-contained HTML report: metrics, what was not run and why, image grids per suite."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def write_report(
    path: Path,
    metrics: dict[str, float],
    not_run: dict[str, str],
    samples: dict[str, list[dict[str, Any]]],
    model: str,
) -> Path:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in metrics.items())
    skipped = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in not_run.items())
    sections = []
    for suite, records in samples.items():
        cells = []
        for r in records:
            marks = ""
            if "scores" in r:
                marks = " ".join(f"{k}:{'✓' if v else '✗'}" for k, v in r["scores"].items())
            imgs = "".join(f'<img src="{html.escape(p)}" width="128">' for p in r["images"])
            cells.append(
                f"<figure>{imgs}<figcaption>[{html.escape(r['category'])}] {html.escape(r['prompt'][:160])}"
                f"<br><small>{marks}</small></figcaption></figure>"
            )
        sections.append(
            f"<h2>{html.escape(suite)} ({len(records)} prompts)</h2><div class='g'>{''.join(cells)}</div>"
        )
    path.write_text(
        "<!doctype html><meta charset='utf-8'><title>lumina evaluation</title>"
        "<style>body{font-family:sans-serif}.g{display:flex;flex-wrap:wrap;gap:8px}"
        "figure{width:280px;margin:0}td{padding:2px 8px}</style>"
        f"<h1>Evaluation of {html.escape(model)}</h1><table>{rows}</table>"
        f"<h2>Not run</h2><ul>{skipped}</ul>{''.join(sections)}",
        encoding="utf-8",
    )
    return path
