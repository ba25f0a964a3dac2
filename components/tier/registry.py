"""Registry of the tier step's quality scorers: each a small plugin with a name and a version.

The scorers live one module each under :mod:`components.tier.scorers` (see :data:`PLUGINS`); every
plugin module has a ``scorers()`` function returning the scorers it can offer *here* (empty when its
package or model is missing). Nothing is imported or checked when this module loads: the plugins
are imported, and their packages, model files and environment variables looked at, on the first
lookup (:func:`available`, :func:`get`, or any read of :data:`SCORERS`). :func:`reload` forgets
them, so the next lookup looks again (e.g. after setting ``LUMINA_AESTHETIC_MLP``).

The plugin modules import :class:`Scorer` from here and this module imports them only by name, when
called, so there is no import circle between the registry and its plugins.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass

from PIL import Image

from common.errors import ConfigError

ImageScore = Callable[[Image.Image, dict], float]


@dataclass(frozen=True)
class Scorer:
    name: str
    version: str
    fn: ImageScore
    higher_is_better: bool = True
    description: str = ""
    prepare: Callable[[], object] | None = None  # fetch/load weights once; raises if unavailable

    def __call__(self, image: Image.Image, row: dict) -> float:
        return float(self.fn(image, row))


_PACKAGE = "components.tier.scorers"
BUILTIN_PLUGINS = (f"{_PACKAGE}.builtin",)
"""Scorers without a model (numpy/scipy only): resolution, sharpness, exposure, contrast,
colorfulness, caption richness."""
MODEL_PLUGINS = tuple(
    f"{_PACKAGE}.{name}"
    for name in ("brisque", "niqe", "nsfw", "text_density", "caption_language", "aesthetic")
)
"""Model-based scorers, registered only where their package and model are present."""
PLUGINS = BUILTIN_PLUGINS + MODEL_PLUGINS
"""Every plugin module, in the order their scorers are listed."""


def plugin_scorers(modules: tuple[str, ...] = PLUGINS) -> list[Scorer]:
    """The scorers the given plugin modules offer now (imports them; checks packages, files, env)."""
    return [scorer for module in modules for scorer in importlib.import_module(module).scorers()]


def model_scorers() -> list[Scorer]:
    """The model-based scorers available here, looked up afresh (not registered by this call)."""
    return plugin_scorers(MODEL_PLUGINS)


class ScorerRegistry(MutableMapping[str, Scorer]):
    """Name -> :class:`Scorer`, filled from :data:`PLUGINS` on first use (any read or write).

    A scorer set by hand (:func:`register`, ``SCORERS[name] = ...``) is added after the plugins',
    so it replaces a plugin's scorer of the same name."""

    def __init__(self) -> None:
        self._scorers: dict[str, Scorer] = {}
        self._loaded = False
        self._lock = threading.RLock()

    def _load(self) -> dict[str, Scorer]:
        if not self._loaded:
            with self._lock:
                if not self._loaded:
                    self._scorers = {s.name: s for s in plugin_scorers()}
                    self._loaded = True
        return self._scorers

    def reload(self) -> None:
        """Forget every scorer (plugins and by hand): the next lookup asks the plugins again."""
        with self._lock:
            self._scorers, self._loaded = {}, False

    def __getitem__(self, name: str) -> Scorer:
        return self._load()[name]

    def __setitem__(self, name: str, scorer: Scorer) -> None:
        self._load()[name] = scorer

    def __delitem__(self, name: str) -> None:
        del self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._load()))

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __repr__(self) -> str:
        return f"ScorerRegistry({list(self._scorers) if self._loaded else 'not loaded'})"


SCORERS = ScorerRegistry()


def register(scorer: Scorer) -> Scorer:
    """Add (or replace) a scorer by its name."""
    SCORERS[scorer.name] = scorer
    return scorer


def get(name: str) -> Scorer:
    """The scorer called ``name``; :class:`~common.errors.ConfigError` listing the others if none."""
    return available([name])[0]


def available(names: list[str] | None = None) -> list[Scorer]:
    """The registered scorers, optionally restricted (and checked) by name."""
    if names is None:
        return list(SCORERS.values())
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ConfigError(f"unknown scorer(s) {', '.join(unknown)}; available: {', '.join(SCORERS)}")
    return [SCORERS[n] for n in names]


def reload() -> None:
    """Forget the registered scorers; the next lookup registers the plugins' scorers again."""
    SCORERS.reload()
