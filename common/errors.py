"""Error types with one-line, user-facing messages (the CLI prints them without a traceback)."""

from __future__ import annotations

from pydantic import ValidationError


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


def error_summary(exc: BaseException, limit: int | None = None) -> str:
    """``Type: first message line`` (just ``Type`` when the message is empty), the line cut to
    ``limit`` characters: how a reported, non-fatal failure is described."""
    text = str(exc).strip()
    line = text.splitlines()[0][:limit] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def validation_message(exc: ValidationError, what: str = "value") -> str:
    """A pydantic error as one line: ``invalid <field path>: <message>`` (first error only)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or what
    return f"invalid {where}: {first['msg']}"
