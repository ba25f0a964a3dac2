"""Shared CLI runner: user errors become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import logging
import sys

import click
import typer
from pydantic import ValidationError
from typer._click.exceptions import ClickException as TyperClickException  # typer vendors click
from typer._click.exceptions import NoArgsIsHelpError

from model.errors import LuminaError, validation_message

# typer >= 0.2x ships its own copy of click: catch its exceptions and the real click's alike
_CLICK_ERRORS = (click.ClickException, TyperClickException)
_EXITS = (click.exceptions.Exit, typer.Exit)
_ABORTS = (click.Abort, typer.Abort)


def run_cli(app: typer.Typer) -> None:
    """Run a typer app with structured logs and one-line errors for what a user can fix."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    try:
        app(standalone_mode=False)
    except LuminaError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValidationError as exc:
        typer.echo(f"error: {validation_message(exc)}", err=True)
        sys.exit(2)
    except _EXITS as exc:
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:
        exc.show()  # the help text
        sys.exit(2)
    except _CLICK_ERRORS as exc:  # bad usage: unknown option, value out of range, missing argument
        typer.echo(f"error: {exc.format_message()} (see --help)", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    except _ABORTS:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
