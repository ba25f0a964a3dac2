"""Resolve a model source to a local diffusers folder.

Sources:

- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: an MLflow registered model version
  (tracking server from ``MLFLOW_TRACKING_URI``); the version's ``source`` artifacts are
  downloaded with ``mlflow.artifacts.download_artifacts``
- ``s3://bucket/prefix``: every object under the prefix, paginated (boto3; ``AWS_ENDPOINT_URL``
  selects MinIO / a loopback server, credentials come from the usual AWS variables)
- a local folder holding ``model_index.json`` (used in place, nothing is copied)

Downloads land in ``dest`` and finish with a marker file naming the source, so a second resolve
of the same source (an init container, then the server) reuses the folder. The S3 client, the
registry download, the staging and the resolution itself live in :mod:`storage` (shared with the
pipeline steps: the train step's ``base_model`` resolves through :mod:`storage.models`); this
module keeps the CLI.

CLI: ``python -m serving.fetch --source SRC --dest DIR`` prints the resolved folder; errors are
one line on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from storage.models import fetch_s3, resolve_source
from storage.registry import fetch_mlflow, parse_models_uri
from storage.staging import MARKER, MODEL_INDEX, find_pipeline_folder

__all__ = [
    "DEFAULT_MODEL_DIR",
    "MARKER",
    "MODEL_INDEX",
    "fetch_mlflow",
    "fetch_s3",
    "find_pipeline_folder",
    "parse_models_uri",
    "resolve_source",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(tempfile.gettempdir()) / "lumina-model"


app = typer.Typer(add_completion=False, help="Resolve a model source to a local diffusers folder.")


@app.command()
def fetch(
    source: Annotated[
        str | None,
        typer.Option(
            help="models:/<name>@<alias>, s3://bucket/prefix or a folder (default LUMINA_MODEL_SOURCE)"
        ),
    ] = None,
    dest: Annotated[Path | None, typer.Option(help="download folder (default LUMINA_MODEL_DIR)")] = None,
) -> None:
    """Download (or validate) the model and print the local pipeline folder."""
    source = source or os.environ.get("LUMINA_MODEL_SOURCE", "")
    dest = dest or Path(os.environ.get("LUMINA_MODEL_DIR") or DEFAULT_MODEL_DIR)
    folder = resolve_source(source, dest)
    typer.echo(str(folder))


def main() -> None:
    from common.cli import run_cli

    run_cli(app)


if __name__ == "__main__":
    main()
