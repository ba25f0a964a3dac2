"""Write generated images where the official evaluators look for them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from components.evaluate.suites import PromptItem


def grid(images: list[Image.Image], cols: int = 2) -> Image.Image:
    width, height = images[0].size
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * width, rows * height), "white")
    for k, img in enumerate(images):
        canvas.paste(img, ((k % cols) * width, (k // cols) * height))
    return canvas


def _safe(prompt: str) -> str:
    return re.sub(r"[^\w ,.'-]", "_", prompt)[:200]


def save_item(root: Path, item: PromptItem, images: list[Image.Image]) -> list[Path]:
    """GenEval: ``NNNNN/metadata.jsonl`` + ``samples/NNNN.png``; DPG-Bench: one 2x2 grid
    ``<id>.png``; T2I-CompBench: ``<category>/samples/<prompt>_NNNNNN.png``; synthetic:
    ``NNNNN.png``. Returns the written image paths."""
    if item.suite == "geneval":
        folder = root / "geneval" / f"{item.index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(item.metadata) + "\n")
        paths = [folder / "samples" / f"{k:04d}.png" for k in range(len(images))]
    elif item.suite == "dpg":
        folder = root / "dpg"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{item.metadata['id']}.png"
        grid(images).save(path)
        return [path]
    elif item.suite == "t2i-compbench":
        folder = root / "t2i-compbench" / item.category / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [
            folder / f"{_safe(item.prompt)}_{item.index * len(images) + k:06d}.png"
            for k in range(len(images))
        ]
    else:
        folder = root / item.suite
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{item.index:05d}_{k}.png" for k in range(len(images))]
    for img, path in zip(images, paths, strict=True):
        img.save(path)
    return paths
