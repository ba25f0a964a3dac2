"""Shared CLI runner: user errors become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

import click
import typer
from pydantic import ValidationError
from typer._click.exceptions import ClickException as TyperClickException  # typer vendors click
from typer._click.exceptions import NoArgsIsHelpError

from common.errors import LuminaError, validation_message
from common.logs import configure_logging, log_format
from common.process import skip_exit_collection

# typer >= 0.2x ships its own copy of click: catch its exceptions and the real click's alike
_CLICK_ERRORS = (click.ClickException, TyperClickException)
_EXITS = (click.exceptions.Exit, typer.Exit)
_ABORTS = (click.Abort, typer.Abort)


def fail(message: str, code: int = 2) -> NoReturn:
    """End a command with ``error: <message>`` on stderr (also a JSON record when logs are JSON)."""
    if log_format() == "json":  # run_cli has checked the setting already
        logging.getLogger("lumina.cli").error(message, extra={"exit_code": code})
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)


def run_cli(app: typer.Typer) -> None:
    """Run a typer app with structured logs (:mod:`common.logs`) and one-line errors for what a user
    can fix. The process skips the final garbage collection at exit (:func:`skip_exit_collection`)."""
    skip_exit_collection()
    try:
        configure_logging()
    except LuminaError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    try:
        app(standalone_mode=False)
    except LuminaError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(validation_message(exc))
    except _EXITS as exc:
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:
        exc.show()  # the help text
        sys.exit(2)
    except _CLICK_ERRORS as exc:  # bad usage: unknown option, value out of range, missing argument
        fail(f"{exc.format_message()} (see --help)", getattr(exc, "exit_code", 2))
    except _ABORTS:
        fail("aborted", 1)
