"""Logging for every entry point: readable text on a terminal, JSON lines on a cluster.

``LUMINA_LOG_FORMAT`` = ``text`` (default) or ``json`` (one object per line: ``time``, ``level``,
``logger``, ``message`` and any ``extra=`` fields, what log collectors such as Loki, Fluent Bit or
Cloud Logging parse; set ``TQDM_DISABLE=1`` beside it, as the Helm chart does, so progress bars do
not interleave with the records); ``LUMINA_LOG_LEVEL`` = ``DEBUG`` / ``INFO`` (default) /
``WARNING`` / ``ERROR`` (below DEBUG, the INFO lines of chatty libraries are dropped).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from common.errors import ConfigError

LOG_FORMAT_ENV = "LUMINA_LOG_FORMAT"
LOG_LEVEL_ENV = "LUMINA_LOG_LEVEL"
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# libraries whose INFO chatter drowns the pipeline's own lines
QUIET_LOGGERS = ("great_expectations", "alembic", "botocore", "urllib3", "httpx")


def log_formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``fmt`` (``text`` or ``json``)."""
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
            json_ensure_ascii=False,
        )
    return logging.Formatter(TEXT_FORMAT)


class _QuietLibraries(logging.Filter):
    """Drop records under WARNING from the chatty libraries, whatever level they set themselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".", 1)[0] not in QUIET_LOGGERS


def _setting(name: str, default: str, allowed: tuple[str, ...], normalise: Callable[[str], str]) -> str:
    """An environment setting, normalised and checked against ``allowed``."""
    given = os.environ.get(name) or default
    value = normalise(given.strip())
    if value not in allowed:
        raise ConfigError(f"{name}={given!r} is not one of {', '.join(allowed)}")
    return value


def log_format() -> str:
    """``LUMINA_LOG_FORMAT`` (``text`` or ``json``; default ``text``)."""
    return _setting(LOG_FORMAT_ENV, "text", FORMATS, str.lower)


def configure_logging() -> None:
    """Send every logger's records to stderr in :func:`log_format` at ``LUMINA_LOG_LEVEL``; a value
    outside the known ones is a one-line :class:`ConfigError`."""
    fmt = log_format()
    level = _setting(LOG_LEVEL_ENV, "INFO", LEVELS, str.upper)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_formatter(fmt))
    if level != "DEBUG":
        handler.addFilter(_QuietLibraries())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def configure_logging_if_requested() -> None:
    """:func:`configure_logging` when ``LUMINA_LOG_FORMAT`` or ``LUMINA_LOG_LEVEL`` is set (the
    compiled pipeline sets them on every task); otherwise the caller's logging is left alone (the
    KFP executor's own handler on the local runner)."""
    if os.environ.get(LOG_FORMAT_ENV) or os.environ.get(LOG_LEVEL_ENV):
        configure_logging()
