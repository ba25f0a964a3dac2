"""A small training set of coloured shapes with ground-truth captions, shared by the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def make_manifest(root: Path, n: int = 24) -> Path:
    """Synthetic shapes with ground-truth captions, in the training-manifest schema."""
    rows = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        color = list(COLORS)[i % 4]
        side = "left" if i % 2 else "right"
        shape = "circle" if i % 3 else "square"
        w, h = (96, 64) if i % 5 == 0 else (64, 64)
        img = Image.new("RGB", (w, h), (245, 245, 245))
        x0 = 6 if side == "left" else w // 2 + 2
        box = (x0, 18, x0 + 26, 44)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        path = root / f"img{i:03d}.png"
        img.save(path)
        caps = [
            {"granularity": "short", "language": "en", "text": f"a {color} {shape} on the {side}"},
            {"granularity": "tag", "language": "en", "text": f"{color}, {shape}, {side}"},
        ]
        rows.append(
            {"id": f"s{i:03d}", "image_path": path.name, "domain": "synthetic", "captions": json.dumps(caps)}
        )
    manifest = root / "train.parquet"
    pd.DataFrame(rows).to_parquet(manifest)
    return manifest
