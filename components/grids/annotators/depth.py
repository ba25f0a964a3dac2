"""Depth maps from a transformers depth-estimation model (``AutoModelForDepthEstimation``: Depth
Anything, DPT / MiDaS, ...), given by ``LUMINA_DEPTH_MODEL`` or ``GridConfig.weights["depth"]``.

The map is the model's prediction resized to the image, min-max scaled to grey levels with
**brighter = nearer** (relative models predict inverse depth, so it is used as is; a metric model's
depth is inverted), the convention of the ground-truth depth maps too."""

from __future__ import annotations

import numpy as np
from PIL import Image

from components.grids.annotators.models import load, offer_model
from components.grids.annotators.registry import Annotator

NAME = "depth"
MODEL_CLASS = "AutoModelForDepthEstimation"


def to_grey(values: np.ndarray, invert: bool = False) -> Image.Image:
    """Min-max scale a 2-D array to an 8-bit grey image (all black when it is constant)."""
    values = np.asarray(values, dtype=np.float64)
    if invert:
        values = -values
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8))


def depth_map(source: str, image: Image.Image) -> Image.Image:
    import torch

    processor, model = load(source, MODEL_CLASS)
    inputs = processor(images=image, return_tensors="pt").to(model.device)
    with torch.no_grad():
        outputs = model(**inputs)
    depth = processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])
    values = depth[0]["predicted_depth"].float().cpu().numpy()
    metric = getattr(model.config, "depth_estimation_type", "relative") == "metric"
    return to_grey(values, invert=metric).convert("RGB")


def offer(source: str | None) -> Annotator | str:
    description = "depth-estimation model, brighter = nearer"
    return offer_model(NAME, "depth", source, MODEL_CLASS, depth_map, description)
