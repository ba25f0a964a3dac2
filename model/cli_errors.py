"""Shared CLI runner: user errors become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import logging
import sys

import click
import typer
from pydantic import ValidationError

from model.errors import LuminaError, validation_message


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
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
