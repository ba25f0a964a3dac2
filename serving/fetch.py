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
registry download and the staging live in :mod:`storage` (shared with the pipeline steps).

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

from model.errors import WeightsNotFoundError, first_line
from storage import StorageError, parse_s3, s3_client
from storage.registry import fetch_mlflow, parse_models_uri
from storage.staging import (
    MARKER,
    MODEL_INDEX,
    abandon_staging,
    cached_download,
    find_pipeline_folder,
    finish_staging,
    start_staging,
)

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


# ------------------------------------------------------------------------------------ S3
def fetch_s3(source: str, dest: Path, page_size: int | None = None) -> Path:
    """Every object under the ``s3://`` prefix (listed ``page_size`` keys a page) into ``dest``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        bucket, prefix = parse_s3(source)
    except StorageError:
        raise WeightsNotFoundError(f"bad S3 source {source!r}: expected s3://bucket/prefix") from None
    prefix = prefix.strip("/")
    client = s3_client()
    staging = start_staging(dest)
    listed = f"{prefix}/" if prefix else ""
    count = 0
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=listed, PaginationConfig={"PageSize": page_size} if page_size else {}
        )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                relative = key[len(listed) :]
                if not relative or key.endswith("/"):
                    continue
                target = staging / relative
                if staging.resolve() not in target.resolve().parents:
                    raise WeightsNotFoundError(f"refusing S3 key outside the prefix: {key}")
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, key, str(target))
                count += 1
    except (BotoCoreError, ClientError) as exc:
        abandon_staging(staging)
        raise WeightsNotFoundError(f"cannot download {source}: {first_line(exc)}") from exc
    except WeightsNotFoundError:
        abandon_staging(staging)
        raise
    if count == 0:
        abandon_staging(staging)
        raise WeightsNotFoundError(f"no objects under {source}")
    log.info("downloaded %d objects from %s", count, source)
    return finish_staging(dest, source, staging)


# --------------------------------------------------------------------------------- entry
def resolve_source(source: str, dest: str | Path) -> Path:
    """A local diffusers folder for ``source`` (see the module docstring); raises
    :class:`WeightsNotFoundError` with a one-line message."""
    source = (source or "").strip()
    if not source:
        raise WeightsNotFoundError("no model source: set LUMINA_MODEL_SOURCE or pass --model / --source")
    dest = Path(dest).expanduser()
    if source.startswith(("models:/", "s3://")):
        cached = cached_download(dest, source)
        if cached is not None:
            log.info("using cached %s in %s", source, cached)
            return cached
        return fetch_mlflow(source, dest) if source.startswith("models:/") else fetch_s3(source, dest)
    if "://" in source:
        raise WeightsNotFoundError(
            f"unsupported model source {source!r}: use models:/<name>@<alias>, s3://bucket/prefix or a folder"
        )
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise WeightsNotFoundError(f"model folder not found: {folder}")
    if not (folder / MODEL_INDEX).is_file():
        raise WeightsNotFoundError(f"{folder} is not a diffusers pipeline folder (no {MODEL_INDEX})")
    return folder


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
    from model.cli_errors import run_cli

    run_cli(app)


if __name__ == "__main__":
    main()
