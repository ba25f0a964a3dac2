"""Exact condition maps of a synthetic scene (:mod:`data_tools.synthetic`) from its metadata: no
annotator, nothing estimated.

- ``mask``: the object masks, each visible object in its own colour on black (an instance map).
- ``depth``: by draw order, **later objects nearer** (they are painted over the earlier ones): the
  background is black, object ``i`` of ``n`` is grey level ``round(255 * (i + 1) / n)``, so brighter
  = nearer, as in the depth annotator's maps.
- ``canny``: the outline of every visible region, one pixel wide on the nearer side of each
  boundary (the object's own edge pixels; where objects overlap, the top one's): what an edge
  detector finds on the flat render, here exact.

The objects' boxes are in the image's pixels; :func:`fit_objects` maps them into a resized and
cropped panel, so the maps are drawn at the panel's size (crisp, aligned with the panel's image).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from common.errors import ConfigError
from data_tools.synthetic import COLORS, SHAPES, SceneObject
from data_tools.synthetic import _draw as draw_object  # the scene renderer's own shapes

GROUND_TRUTH_KINDS = ("canny", "depth", "mask")
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
)  # fmt: skip


def scene_objects(objects: Any) -> list[SceneObject]:
    """Scene objects from metadata (a JSON list, dicts with shape/color/region/bbox, or objects);
    :class:`ConfigError` naming the first bad one."""
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"scene objects are not valid JSON: {exc.msg}") from None
    out = []
    for i, obj in enumerate(objects or []):
        if isinstance(obj, Mapping):
            try:
                obj = SceneObject(obj["shape"], obj["color"], obj.get("region", ""), tuple(obj["bbox"]))
            except (KeyError, TypeError):
                raise ConfigError(f"scene object {i} lacks shape, color or bbox") from None
        if not isinstance(obj, SceneObject) or obj.shape not in SHAPES or obj.color not in COLORS:
            raise ConfigError(f"scene object {i} is not a synthetic shape: {obj!r}"[:200])
        if len(obj.bbox) != 4:
            raise ConfigError(f"scene object {i} needs a bbox of 4 numbers")
        out.append(obj)
    return out


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def object_labels(objects: Iterable[SceneObject | Mapping], size: int | tuple[int, int]) -> np.ndarray:
    """(h, w) int array: 0 background, ``i + 1`` where object ``i`` is visible (later ones on top)."""
    width, height = _size(size)
    labels = np.zeros((height, width), dtype=np.int32)
    for i, obj in enumerate(scene_objects(list(objects))):
        canvas = Image.new("RGB", (width, height))
        draw_object(ImageDraw.Draw(canvas), obj)
        labels[np.asarray(canvas).any(axis=-1)] = i + 1  # every scene colour has a non-zero channel
    return labels


def ground_truth_maps(
    objects: Iterable[SceneObject | Mapping], size: int | tuple[int, int]
) -> dict[str, Image.Image]:
    """``{"depth", "mask", "canny"}`` → RGB map of the scene at ``size`` (``(width, height)`` or a
    side), in the coordinates of the objects' boxes."""
    objects = scene_objects(list(objects))
    labels = object_labels(objects, size)
    n = max(len(objects), 1)
    levels = np.array([0] + [round(255 * (i + 1) / n) for i in range(len(objects))], dtype=np.uint8)
    palette = np.array([(0, 0, 0)] + [PALETTE[i % len(PALETTE)] for i in range(len(objects))], dtype=np.uint8)
    edges = np.zeros(labels.shape, dtype=bool)  # on the nearer side of each boundary (1 px)
    for a, b in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])):
        differ = labels[a] != labels[b]
        edges[a] |= differ & (labels[a] > labels[b])
        edges[b] |= differ & (labels[b] > labels[a])
    return {
        "depth": Image.fromarray(levels[labels]).convert("RGB"),
        "mask": Image.fromarray(palette[labels]),
        "canny": Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB"),
    }


def fit_box(src: tuple[int, int], dst: tuple[int, int]) -> tuple[float, float, float]:
    """``(scale, left, top)`` of resizing an image of ``src`` (w, h) to cover ``dst`` and centre-cropping
    it (the crop's offsets in the resized image's pixels)."""
    scale = max(dst[0] / src[0], dst[1] / src[1])
    resized = (max(dst[0], round(src[0] * scale)), max(dst[1], round(src[1] * scale)))
    return scale, (resized[0] - dst[0]) // 2, (resized[1] - dst[1]) // 2


def fit_objects(
    objects: Iterable[SceneObject], src: tuple[int, int], dst: tuple[int, int]
) -> list[SceneObject]:
    """The objects' boxes after the cover-resize and centre crop of :func:`fit_box`."""
    scale, left, top = fit_box(src, dst)
    return [
        replace(
            o,
            bbox=(
                o.bbox[0] * scale - left,
                o.bbox[1] * scale - top,
                o.bbox[2] * scale - left,
                o.bbox[3] * scale - top,
            ),
        )
        for o in objects
    ]
