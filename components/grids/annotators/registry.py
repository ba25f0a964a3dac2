"""Registry of the condition-map annotators: each a small plugin (one module under
:mod:`components.grids.annotators`) with a name, a version, the kind of map it draws and a
function image → map image (RGB, the image's size).

Nothing is imported when this module loads: the plugin modules are imported, and their packages and
weights sources looked at, on the first lookup (:func:`available`, :func:`not_run`, :func:`for_kind`);
:func:`reload` forgets them. Every plugin module has ``NAME`` and ``offer(source)``: the
:class:`Annotator` it can offer here, or why not (a one-line reason). ``canny`` and ``sketch``
(OpenCV) are always offered; the model-based ``depth`` and ``pose`` need weights (a local folder or
hub id) from the ``weights`` argument (e.g. ``GridConfig.weights``) or their environment variable
(:data:`WEIGHTS_ENV`), and without them are reported ``not run: no weights configured``. Model
weights are loaded on the first map (or by :meth:`Annotator.prepare`), once per source.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image

from common.errors import ConfigError

MAP_KINDS = ("canny", "sketch", "depth", "pose", "mask")
"""Every kind of condition map a grid can show (``mask``: object masks, ground truth only)."""

ImageMap = Callable[[Image.Image], Image.Image]

_PACKAGE = "components.grids.annotators"
PLUGINS = ("canny", "sketch", "depth", "pose")
"""The plugin modules, in the order their annotators are listed."""
MODEL_PLUGINS = ("depth", "pose")
"""Plugins that need model weights."""
WEIGHTS_ENV = {"depth": "LUMINA_DEPTH_MODEL", "pose": "LUMINA_POSE_MODEL"}
"""Environment variable naming each model annotator's weights (folder or hub id)."""
NO_WEIGHTS = "not run: no weights configured"


@dataclass(frozen=True)
class Annotator:
    name: str
    version: str
    kind: str  # one of MAP_KINDS
    fn: ImageMap
    model: str | None = None  # the weights source of a model-based annotator
    prepare: Callable[[], object] | None = None  # load the weights once; raises if they cannot load
    description: str = ""

    def __call__(self, image: Image.Image) -> Image.Image:
        """The map of ``image``: RGB, the image's size."""
        image = image.convert("RGB")
        out = self.fn(image).convert("RGB")
        return out if out.size == image.size else out.resize(image.size, Image.BILINEAR)

    @property
    def needs_weights(self) -> bool:
        return self.model is not None


def weights_sources(weights: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each model annotator's weights source: ``weights`` first, else its environment variable."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(MODEL_PLUGINS))
    if unknown:
        raise ConfigError(
            f"no model annotator {', '.join(unknown)}; weights are for: {', '.join(MODEL_PLUGINS)}"
        )
    sources = {}
    for name in MODEL_PLUGINS:
        source = weights.get(name) or os.environ.get(WEIGHTS_ENV[name], "")
        if source.strip():
            sources[name] = source.strip()
    return sources


_lock = threading.Lock()
_cache: dict[tuple[tuple[str, str], ...], tuple[dict[str, Annotator], dict[str, str]]] = {}


def lookup(weights: Mapping[str, str] | None = None) -> tuple[dict[str, Annotator], dict[str, str]]:
    """``(name → annotator offered here, name → why not run)``, registered on first use per weights."""
    sources = weights_sources(weights)
    key = tuple(sorted(sources.items()))
    with _lock:
        if key not in _cache:
            offered: dict[str, Annotator] = {}
            reasons: dict[str, str] = {}
            for plugin in PLUGINS:
                module = importlib.import_module(f"{_PACKAGE}.{plugin}")
                result = module.offer(sources.get(module.NAME))
                if isinstance(result, Annotator):
                    offered[result.name] = result
                else:
                    reasons[module.NAME] = str(result)
            _cache[key] = (offered, reasons)
        offered, reasons = _cache[key]
    return dict(offered), dict(reasons)


def available(weights: Mapping[str, str] | None = None) -> list[Annotator]:
    """The annotators offered here (the OpenCV ones always; model ones when weights are given)."""
    return list(lookup(weights)[0].values())


def not_run(weights: Mapping[str, str] | None = None) -> dict[str, str]:
    """The annotators not offered here and why (``not run: no weights configured``, ...)."""
    return lookup(weights)[1]


def for_kind(kind: str, weights: Mapping[str, str] | None = None) -> Annotator | None:
    """The first annotator offered here that draws ``kind`` maps (``None`` when none does)."""
    if kind not in MAP_KINDS:
        raise ConfigError(f"unknown map kind {kind!r}; choose one of: {', '.join(MAP_KINDS)}")
    return next((a for a in available(weights) if a.kind == kind), None)


def reload() -> None:
    """Forget the registered annotators: the next lookup asks the plugins (and environment) again."""
    with _lock:
        _cache.clear()
