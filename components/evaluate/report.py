"""Self-contained HTML reports: every image is embedded as a ``data:image/png;base64`` URI and loss
curves are inline SVG, so nothing is referenced outside the file (no CDN, no relative path): it
renders the same from a KFP ``HTML`` output, an MLflow artifact or a mail attachment.

:func:`write_report` is the evaluate step's report (metrics, what was not run, images per suite);
:func:`build_report` the full one the register step writes (challenger beside champion, the
stages' loss curves and sample grids, the gate decision, the data lineage)."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

PNG_PREFIX = "data:image/png;base64,"
MAX_SIDE = 1024  # larger images are scaled down before embedding
PROMPT_SIDE = 384  # per-prompt images (shown at 160 px) are embedded at most this large
MAX_PROMPTS = 48  # per suite; the rest are counted, not shown (the full set is in the artifacts)
CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:2px;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
.better{color:#1a7f37}.worse{color:#c62828}.note{color:#8a6d00}.missing{color:#999;font-style:italic}
.g{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}figure.p{width:280px}
.pass{background:#e6f4ea;border-left:6px solid #1a7f37;padding:6px 12px}
.hold{background:#fdecea;border-left:6px solid #c62828;padding:6px 12px}
code{font-size:.9em;word-break:break-all}img{image-rendering:auto;max-width:100%}
svg{background:#fafafa;border:1px solid #eee}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def data_uri(source: Path | str | bytes | Image.Image, max_side: int = MAX_SIDE) -> str:
    """The image as a ``data:image/png;base64,...`` URI (any format PIL reads is converted to PNG;
    larger than ``max_side`` is scaled down). Raises OSError / ValueError when it cannot be read."""
    if isinstance(source, Image.Image):
        image = source
        data = b""
    else:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        image = Image.open(io.BytesIO(data))
        if image.format == "PNG" and max(image.size) <= max_side:
            return PNG_PREFIX + base64.b64encode(data).decode("ascii")
    image.load()
    if image.mode not in ("RGB", "RGBA", "L", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return PNG_PREFIX + base64.b64encode(buffer.getvalue()).decode("ascii")


def img_tag(
    source: Path | str | bytes | Image.Image | None,
    alt: str,
    width: int | None = None,
    max_side: int = MAX_SIDE,
) -> str:
    """An ``<img>`` with the image embedded, or a visible note when it is missing or unreadable."""
    if source is None:
        return f"<span class='missing'>{esc(alt)}: no image</span>"
    try:
        uri = data_uri(source, max_side)
    except (OSError, ValueError) as exc:
        return f"<span class='missing'>{esc(alt)}: image not readable ({esc(type(exc).__name__)})</span>"
    size = f" width='{width}'" if width else ""
    return f"<img src='{uri}' alt='{esc(alt)}' title='{esc(alt)}'{size}>"


def _number(value: object) -> str:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return esc(value)
    return f"{number:.4g}" if math.isfinite(number) else esc(number)


def _finite(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metrics_table(
    metrics: dict[str, float],
    champion: dict[str, float] | None = None,
    lower_is_better: Iterable[str] = ("val_loss",),
    labels: tuple[str, str] = ("challenger", "champion"),
) -> str:
    """The metrics; with ``champion``'s, side by side with delta = challenger − champion and the
    relative change (green: better, red: worse, for the metrics whose direction is known)."""
    lower = set(lower_is_better)
    if champion is None:
        rows = "".join(
            f"<tr><td>{esc(k)}</td><td class='n'>{_number(v)}</td></tr>" for k, v in sorted(metrics.items())
        )
        return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"
    rows = []
    for key in sorted(set(metrics) | set(champion)):
        ours, theirs = _finite(metrics.get(key)), _finite(champion.get(key))
        delta = relative = ""
        css = ""
        if ours is not None and theirs is not None:
            diff = ours - theirs
            delta = f"{diff:+.4g}"
            relative = f"{diff / abs(theirs) * 100:+.2f}%" if theirs else "n/a"
            if diff and (key in lower or key.startswith(("synthetic_", "clip_score", "panel_"))):
                improved = diff < 0 if key in lower else diff > 0
                css = " better" if improved else " worse"
        mine = _number(metrics[key]) if key in metrics else "—"
        other = _number(champion[key]) if key in champion else "—"
        rows.append(
            f"<tr><td>{esc(key)}</td><td class='n'>{mine}</td><td class='n'>{other}</td>"
            f"<td class='n{css}'>{delta}</td><td class='n{css}'>{relative}</td></tr>"
        )
    head = (
        f"<tr><th>metric</th><th>{esc(labels[0])}</th><th>{esc(labels[1])}</th>"
        "<th>delta</th><th>relative</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


@dataclass
class EvalImages:
    """One model's evaluation images: ``samples`` as in ``samples.json`` (suite → records with
    ``prompt``, ``category``, ``images`` relative to ``root``, and ``scores`` for the synthetic suite)."""

    label: str
    samples: dict[str, list[dict[str, Any]]]
    root: Path


def _marks(record: dict[str, Any]) -> str:
    scores = record.get("scores") or {}
    marks = " ".join(f"{esc(k)}:{'✓' if v else '✗'}" for k, v in scores.items())
    if "clip_score" in record:
        marks += f" clip:{_number(record['clip_score'])}"
    return marks


def _images(side: EvalImages, record: dict[str, Any] | None, width: int) -> str:
    if record is None:
        return f"<span class='missing'>{esc(side.label)}: prompt not evaluated</span>"
    tags = [img_tag(side.root / rel, f"{side.label}: {record.get('prompt', '')[:80]}", width, PROMPT_SIDE)
            for rel in record.get("images", [])]  # fmt: skip
    return "".join(tags) or f"<span class='missing'>{esc(side.label)}: no images</span>"


def prompt_images(
    challenger: EvalImages, champion: EvalImages | None = None, width: int = 160, limit: int = MAX_PROMPTS
) -> str:
    """Per suite, per prompt (the first ``limit``): the challenger's images, beside the champion's
    for the same prompt when ``champion`` is given (matched by suite and prompt text)."""
    sections = []
    for suite, records in challenger.samples.items():
        theirs: dict[str, list[dict[str, Any]]] = {}
        for record in champion.samples.get(suite, []) if champion else []:
            theirs.setdefault(record.get("prompt", ""), []).append(record)
        rows = []
        for record in records[:limit]:
            caption = (
                f"[{esc(record.get('category', ''))}] {esc(str(record.get('prompt', ''))[:200])}"
                f"<br><small>{_marks(record)}</small>"
            )
            cells = f"<td>{_images(challenger, record, width)}</td>"
            if champion is not None:
                matches = theirs.get(record.get("prompt", ""), [])
                other = matches.pop(0) if matches else None
                marks = f"<br><small>{_marks(other)}</small>" if other else ""
                cells += f"<td>{_images(champion, other, width)}{marks}</td>"
            rows.append(f"<tr><td style='max-width:320px'>{caption}</td>{cells}</tr>")
        head = f"<tr><th>prompt</th><th>{esc(challenger.label)}</th>"
        head += f"<th>{esc(champion.label)}</th></tr>" if champion is not None else "</tr>"
        table = f"<table class='prompts'>{head}{''.join(rows)}</table>"
        more = (
            f"<p class='note'>{len(records) - limit} more prompts not shown</p>"
            if len(records) > limit
            else ""
        )
        sections.append(f"<h3>{esc(suite)} ({len(records)} prompts)</h3>{table}{more}")
    return "".join(sections) or "<p class='missing'>no images</p>"


PANEL_HEADING = "Grid panels (before / after the unified phase)"
# The grid-panel scores (components.evaluate.panels, the run summary): map kind -> score name; the
# metric is ``panel_`` + the score name (``_before`` for the model before the unified phase).
PANEL_KINDS = (("canny", "canny_f1"), ("mask", "mask_iou"))
PANEL_LABELS = {"canny_f1": "canny edge F1", "mask_iou": "mask IoU"}
PANEL_METRICS = tuple((f"panel_{score}", PANEL_LABELS[score]) for _, score in PANEL_KINDS)


@dataclass
class PanelImages:
    """The grid-panel records (:func:`components.evaluate.panels.merge_records`: per scene
    ``prompt``, ``image``, ``truth`` and ``before`` / ``after`` with ``generated`` and ``scores``),
    image paths relative to ``root``."""

    records: list[dict[str, Any]]
    root: Path


def panel_section(
    metrics: dict[str, float], panels: PanelImages, width: int = 96, limit: int = MAX_PROMPTS
) -> str:
    """The grid-panel metrics before / after the unified phase, and per scene the known image, the
    ground-truth maps and the generated panels of both models (the first ``limit`` scenes)."""
    has_before = any(f"{key}_before" in metrics for key, _ in PANEL_METRICS) or any(
        "before" in r for r in panels.records
    )
    rows = []
    for key, name in PANEL_METRICS:
        after, before = metrics.get(key), metrics.get(f"{key}_before")
        delta = ""
        if _finite(after) is not None and _finite(before) is not None:
            diff = float(after) - float(before)  # type: ignore[arg-type]
            css = " better" if diff > 0 else " worse" if diff < 0 else ""
            delta = f"<td class='n{css}'>{diff:+.4g}</td>"
        else:
            delta = "<td class='n'>—</td>"
        mine = _number(after) if after is not None else "—"
        theirs = _number(before) if before is not None else "—"
        rows.append(
            f"<tr><td>{esc(name)} <small><code>{esc(key)}</code></small></td>"
            f"<td class='n'>{theirs}</td><td class='n'>{mine}</td>{delta}</tr>"
        )
    table = (
        "<table class='panel-metrics'><tr><th>metric</th><th>before</th><th>after</th><th>delta</th></tr>"
        f"{''.join(rows)}</table>"
    )
    note = (
        ""
        if has_before
        else "<p class='note'>no baseline given: the model before the unified phase was not scored</p>"
    )

    def image(rel: str | None, alt: str) -> str:
        return img_tag(panels.root / rel if rel else None, alt, width, PROMPT_SIDE)

    def model_cells(record: dict[str, Any], side: str) -> str:
        entry = record.get(side)
        if entry is None:
            return "".join(f"<td class='missing'>{esc(side)}: not generated</td>" for _ in PANEL_KINDS)
        cells = []
        for kind, score in PANEL_KINDS:
            value = (entry.get("scores") or {}).get(score)
            label = f"{side} {kind}"
            cells.append(
                f"<td>{image((entry.get('generated') or {}).get(kind), label)}"
                f"<br><small>{esc(score)} {_number(value) if value is not None else '—'}</small></td>"
            )
        return "".join(cells)

    scene_rows = []
    for record in panels.records[:limit]:
        truth = record.get("truth") or {}
        cells = (
            f"<td style='max-width:240px'>{esc(str(record.get('prompt', ''))[:200])}</td>"
            f"<td>{image(record.get('image'), 'known image')}</td>"
            + "".join(f"<td>{image(truth.get(kind), f'ground truth {kind}')}</td>" for kind, _ in PANEL_KINDS)
        )
        if has_before:
            cells += model_cells(record, "before")
        cells += model_cells(record, "after")
        scene_rows.append(f"<tr>{cells}</tr>")
    head = "<tr><th>prompt</th><th>image (known)</th><th>truth canny</th><th>truth mask</th>"
    if has_before:
        head += "<th>before canny</th><th>before mask</th>"
    head += "<th>after canny</th><th>after mask</th></tr>"
    more = (
        f"<p class='note'>{len(panels.records) - limit} more scenes not shown</p>"
        if len(panels.records) > limit
        else ""
    )
    scenes = f"<table class='panel-scenes'>{head}{''.join(scene_rows)}</table>{more}" if scene_rows else ""
    intro = (
        "<p>Held-out synthetic scenes: the image panel is known, the map panel generated "
        "(upper-lower grid); canny scored by edge F1 (1 px tolerance), masks by foreground IoU.</p>"
    )
    return intro + table + note + scenes


def loss_svg(points: Sequence[tuple[int, float]], title: str, width: int = 520, height: int = 220) -> str:
    """A loss curve as inline SVG: the logged values and their moving average, the step and loss
    ranges on the axes. Non-finite values are left out (and counted in the title)."""
    finite = [(int(s), float(v)) for s, v in points if _finite(v) is not None]
    dropped = len(points) - len(finite)
    label = title + (f" ({dropped} non-finite values left out)" if dropped else "")
    if not finite:
        return f"<p class='missing'>{esc(label)}: no finite loss values</p>"
    finite.sort()
    left, right, top, bottom = 56, 12, 24, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    s0, s1 = finite[0][0], finite[-1][0]
    lo, hi = min(v for _, v in finite), max(v for _, v in finite)
    span_s, span_v = (s1 - s0) or 1, (hi - lo) or (abs(hi) or 1.0)

    def xy(step: int, value: float) -> str:
        x = left + (step - s0) / span_s * plot_w
        y = top + (hi - value) / span_v * plot_h if hi != lo else top + plot_h / 2
        return f"{x:.1f},{y:.1f}"

    window = max(1, len(finite) // 20)
    smooth, acc = [], 0.0
    for i, (step, value) in enumerate(finite):
        acc += value - (finite[i - window][1] if i >= window else 0.0)
        smooth.append((step, acc / min(i + 1, window)))
    raw = " ".join(xy(s, v) for s, v in finite)
    avg = " ".join(xy(s, v) for s, v in smooth)
    cx, cy = xy(*finite[0]).split(",")
    dot = f"<circle cx='{cx}' cy='{cy}' r='3' fill='#1565c0'/>"
    lines = (
        f"<polyline fill='none' stroke='#90caf9' stroke-width='1' points='{raw}'/>"
        f"<polyline fill='none' stroke='#1565c0' stroke-width='2' points='{avg}'/>"
        if len(finite) > 1
        else dot
    )
    axis = (
        f"<line x1='{left}' y1='{top}' x2='{left}' y2='{top + plot_h}' stroke='#999'/>"
        f"<line x1='{left}' y1='{top + plot_h}' x2='{left + plot_w}' y2='{top + plot_h}' stroke='#999'/>"
        f"<text x='{left - 4}' y='{top + 4}' text-anchor='end' font-size='11'>{hi:.4g}</text>"
        f"<text x='{left - 4}' y='{top + plot_h}' text-anchor='end' font-size='11'>{lo:.4g}</text>"
        f"<text x='{left}' y='{height - 10}' font-size='11'>step {s0}</text>"
        f"<text x='{left + plot_w}' y='{height - 10}' text-anchor='end' font-size='11'>step {s1}</text>"
        f"<text x='{left}' y='14' font-size='12'>{esc(label)}</text>"
    )
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='{esc(label)}'>{axis}{lines}</svg>"
    )


@dataclass
class StageTrace:
    """One training stage for the report: its MLflow run, its loss history (step, loss) and its
    sample grids (caption, image file or bytes); ``notes`` say what could not be found."""

    stage: str
    run_id: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)
    grids: list[tuple[str, Path | bytes]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # the run's last values (loss, val_loss)


def stage_sections(stages: Sequence[StageTrace]) -> str:
    parts = []
    for trace in stages:
        run = f" <small>MLflow run <code>{esc(trace.run_id)}</code></small>" if trace.run_id else ""
        curve = loss_svg(trace.losses, f"{trace.stage} loss") if trace.losses else ""
        if trace.metrics:
            last = ", ".join(f"{esc(k)} {_number(v)}" for k, v in trace.metrics.items())
            curve = f"<p>last logged: {last}</p>{curve}"
        grids = "".join(
            f"<figure>{img_tag(src, f'{trace.stage} {caption}')}"
            f"<figcaption>{esc(caption)}</figcaption></figure>"
            for caption, src in trace.grids
        )
        notes = "".join(f"<li class='note'>{esc(n)}</li>" for n in trace.notes)
        parts.append(
            f"<div class='stage' data-stage='{esc(trace.stage)}'><h3>{esc(trace.stage)}{run}</h3>"
            f"{curve}<div class='g'>{grids}</div>{f'<ul>{notes}</ul>' if notes else ''}</div>"
        )
    return "".join(parts) or "<p class='missing'>no training stages recorded</p>"


@dataclass
class Decision:
    """What the promotion gate decided for the registered version."""

    promoted: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    summary: str = ""  # the version's ``promotion`` tag
    champion: str = ""  # the champion version it was checked against ("" when none)


def gate_section(decision: Decision) -> str:
    if decision.promoted:
        verdict = "promoted to <b>champion</b>"
        against = f" (replacing v{esc(decision.champion)})" if decision.champion else " (no champion before)"
    else:
        verdict = "<b>not promoted</b>: the champion stays"
        against = f" (v{esc(decision.champion)})" if decision.champion else ""
    aliases = ", ".join(decision.aliases) or "none"
    reasons = "".join(f"<li>{esc(r)}</li>" for r in decision.reasons)
    notes = "".join(f"<li class='note'>{esc(n)}</li>" for n in decision.notes)
    return (
        f"<div class='{'pass' if decision.promoted else 'hold'}' id='decision' "
        f"data-promoted='{str(decision.promoted).lower()}'><p>{verdict}{against}; aliases: {esc(aliases)}</p>"
        + (f"<p>Reasons:</p><ul class='reasons'>{reasons}</ul>" if reasons else "")
        + (f"<p>Notes (not blocking):</p><ul>{notes}</ul>" if notes else "")
        + (f"<p><small>recorded: {esc(decision.summary)}</small></p>" if decision.summary else "")
        + "</div>"
    )


def key_value_table(rows: dict[str, str]) -> str:
    cells = "".join(
        f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>"
        if v
        else f"<tr><th>{esc(k)}</th><td class='missing'>not given</td></tr>"
        for k, v in rows.items()
    )
    return f"<table>{cells}</table>"


def not_run_list(not_run: dict[str, str]) -> str:
    items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in not_run.items())
    return f"<ul>{items}</ul>" if items else "<p>everything was run</p>"


def render(title: str, sections: Sequence[tuple[str, str, str]], subtitle: str = "") -> str:
    """The document: ``sections`` are (id, heading, inner HTML)."""
    body = "".join(f"<section id='{esc(i)}'><h2>{esc(h)}</h2>{inner}</section>" for i, h, inner in sections)
    sub = f"<p>{subtitle}</p>" if subtitle else ""
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{esc(title)}</h1>{sub}{body}</body></html>"
    )


def build_report(
    title: str,
    *,
    metrics: dict[str, float],
    challenger: EvalImages | None = None,
    champion: EvalImages | None = None,
    champion_metrics: dict[str, float] | None = None,
    not_run: dict[str, str] | None = None,
    decision: Decision | None = None,
    stages: Sequence[StageTrace] = (),
    lineage: dict[str, str] | None = None,
    notes: Sequence[str] = (),
    subtitle: str = "",
    panels: PanelImages | None = None,
) -> str:
    """The full report: gate decision, metrics (with deltas against the champion), per-prompt
    images (challenger beside champion), the grid panels before / after the unified phase (with
    ``panels``), per-stage loss curves and sample grids, what was not run, the data lineage, and
    ``notes`` on whatever could not be found."""
    labels = (challenger.label if challenger else "challenger", champion.label if champion else "champion")
    sections: list[tuple[str, str, str]] = []
    if decision is not None:
        sections.append(("gate", "Gate decision", gate_section(decision)))
    sections.append(("metrics", "Metrics", metrics_table(metrics, champion_metrics, labels=labels)))
    if notes:
        items = "".join(f"<li class='note'>{esc(n)}</li>" for n in notes)
        sections.append(("notes", "Notes", f"<ul>{items}</ul>"))
    if challenger is not None:
        sections.append(("images", "Images per prompt", prompt_images(challenger, champion)))
    if panels is not None and panels.records:
        sections.append(("panels", PANEL_HEADING, panel_section(metrics, panels)))
    if stages:
        sections.append(("stages", "Training stages", stage_sections(stages)))
    if not_run is not None:
        sections.append(("not-run", "Not run", not_run_list(not_run)))
    if lineage is not None:
        sections.append(("lineage", "Data lineage", key_value_table(lineage)))
    return render(title, sections, subtitle)


def write_report(
    path: Path,
    metrics: dict[str, float],
    not_run: dict[str, str],
    samples: dict[str, list[dict[str, Any]]],
    model: str,
    root: Path | None = None,
    panels: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """The evaluate step's report: metrics, what was not run and why, images per suite (paths in
    ``samples`` relative to ``root``, default the report's folder), the grid panels before / after
    the unified phase (``panels``: :func:`components.evaluate.panels.merge_records`), every image
    embedded."""
    images = EvalImages(Path(model).name or model, samples, root or path.parent)
    grid = PanelImages(list(panels), root or path.parent) if panels else None
    text = build_report(
        f"Evaluation of {model}", metrics=metrics, challenger=images, not_run=not_run, panels=grid
    )
    path.write_text(text, encoding="utf-8")
    return path
