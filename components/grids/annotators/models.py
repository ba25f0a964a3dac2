"""Shared by the model-based annotators: checking a weights source, loading a transformers model and
its image processor once per source, and the device they run on."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from common.errors import WeightsNotFoundError, first_line
from components.grids.annotators.registry import NO_WEIGHTS, WEIGHTS_ENV, Annotator
from storage.models import is_hub_id


def source_problem(name: str, source: str | None) -> str | None:
    """Why ``source`` cannot be offered (one line), or ``None`` when it looks usable: an existing
    folder or a hub id (``owner/name``; fetched from the hub on first use)."""
    if not source:
        return f"{NO_WEIGHTS} (set {WEIGHTS_ENV[name]} or GridConfig.weights[{name!r}])"
    if Path(source).expanduser().is_dir() or is_hub_id(source):
        return None
    return f"not run: weights not found: {source}"


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=4)
def load(source: str, model_class: str) -> tuple[Any, Any]:
    """``(image processor, model in eval mode)`` of ``source`` (``model_class``: a transformers class
    name, e.g. ``AutoModelForDepthEstimation``); :class:`WeightsNotFoundError` in one line."""
    import transformers

    path = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(path)
        model = getattr(transformers, model_class).from_pretrained(path)
    except Exception as exc:  # missing files, bad config, no network: several types
        raise WeightsNotFoundError(f"cannot load {model_class} from {source}: {first_line(exc)}") from None
    return processor, model.eval().to(device())


def offer_model(
    name: str, kind: str, source: str | None, model_class: str, annotate: Any, description: str
) -> Annotator | str:
    """A model-based annotator for ``source`` weights (``annotate(source, image)``), or why not."""
    problem = source_problem(name, source)
    if problem:
        return problem
    assert source is not None
    from transformers import __version__ as transformers_version

    return Annotator(
        name,
        f"1+transformers-{transformers_version}",
        kind,
        functools.partial(annotate, source),
        model=source,
        prepare=functools.partial(load, source, model_class),
        description=description,
    )
