"""Error types with one-line, user-facing messages (the CLI prints them without a traceback)."""

from __future__ import annotations


class LuminaError(Exception):
    """Base class for errors a user can fix (bad input, missing files, bad configs)."""


class ConfigError(LuminaError):
    """A configuration value is invalid (unknown profile, bad resolution, bad option)."""


class WeightsNotFoundError(LuminaError):
    """A weights path or hub id could not be resolved to a model folder."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
