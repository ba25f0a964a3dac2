"""Resolve a model source to a local diffusers folder.

Sources:

- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: an MLflow registered model version
  (tracking server from ``MLFLOW_TRACKING_URI``); the version's ``source`` artifacts are
  downloaded with ``mlflow.artifacts.download_artifacts``
- ``s3://bucket/prefix``: every object under the prefix, paginated (boto3; ``AWS_ENDPOINT_URL``
  selects MinIO / a loopback server, credentials come from the usual AWS variables)
- a local folder holding ``model_index.json`` (used in place, nothing is copied)

Downloads land in ``dest`` and finish with a marker file naming the source, so a second resolve
of the same source (an init container, then the server) reuses the folder.

CLI: ``python -m serving.fetch --source SRC --dest DIR`` prints the resolved folder; errors are
one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from model.errors import WeightsNotFoundError, first_line

log = logging.getLogger(__name__)

MARKER = ".lumina-source.json"
DEFAULT_MODEL_DIR = Path(tempfile.gettempdir()) / "lumina-model"
MODEL_INDEX = "model_index.json"


def find_pipeline_folder(root: Path, max_depth: int = 3) -> Path | None:
    """``root`` or the shallowest folder below it (up to ``max_depth``) holding ``model_index.json``."""
    frontier = [root]
    for _ in range(max_depth + 1):
        for folder in frontier:
            if (folder / MODEL_INDEX).is_file():
                return folder
        frontier = sorted(
            p for f in frontier for p in f.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not frontier:
            return None
    return None


def _cached(dest: Path, source: str) -> Path | None:
    marker = dest / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if info.get("source") != source:
        return None
    folder = dest / info.get("folder", ".")
    return folder if (folder / MODEL_INDEX).is_file() else None


def _finish(dest: Path, source: str, staging: Path) -> Path:
    """Move a complete download from ``staging`` into ``dest`` and write the marker."""
    folder = find_pipeline_folder(staging)
    if folder is None:
        shutil.rmtree(staging, ignore_errors=True)
        raise WeightsNotFoundError(f"{source} holds no diffusers pipeline ({MODEL_INDEX} not found)")
    for name in _previous_entries(dest):  # replace an older download (of another source)
        old = dest / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    entries = sorted(child.name for child in staging.iterdir())
    for name in entries:
        (staging / name).rename(dest / name)
    staging.rmdir()
    relative = folder.relative_to(staging)
    info = {"source": source, "folder": str(relative), "entries": entries}
    (dest / MARKER).write_text(json.dumps(info))
    return dest / relative


def _previous_entries(dest: Path) -> list[str]:
    """Top-level names an earlier download wrote into ``dest`` (from its marker)."""
    try:
        names = json.loads((dest / MARKER).read_text()).get("entries", [])
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


def _staging(dest: Path) -> Path:
    """A fresh ``dest/.partial``. ``dest`` must be empty or hold only an earlier download: nothing
    else in it is ever deleted."""
    dest.mkdir(parents=True, exist_ok=True)
    ours = {MARKER, ".partial", "lost+found", *_previous_entries(dest)}  # lost+found: a volume root
    foreign = sorted(child.name for child in dest.iterdir() if child.name not in ours)
    if foreign:
        raise WeightsNotFoundError(
            f"download folder {dest} holds other files ({', '.join(foreign[:3])}...); use an empty folder"
            if len(foreign) > 3
            else f"download folder {dest} holds other files ({', '.join(foreign)}); use an empty folder"
        )
    staging = dest / ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


# ------------------------------------------------------------------------------------ S3
def parse_s3(source: str) -> tuple[str, str]:
    rest = source[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise WeightsNotFoundError(f"bad S3 source {source!r}: expected s3://bucket/prefix")
    return bucket, prefix.strip("/")


def fetch_s3(source: str, dest: Path, page_size: int | None = None) -> Path:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = parse_s3(source)
    client = boto3.client(
        "s3",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    )
    staging = _staging(dest)
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
        shutil.rmtree(staging, ignore_errors=True)
        raise WeightsNotFoundError(f"cannot download {source}: {first_line(exc)}") from exc
    if count == 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise WeightsNotFoundError(f"no objects under {source}")
    log.info("downloaded %d objects from %s", count, source)
    return _finish(dest, source, staging)


# -------------------------------------------------------------------------------- MLflow
def parse_models_uri(source: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    rest = source[len("models:/") :].strip("/")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        if name and version:
            return name, None, version
    raise WeightsNotFoundError(f"bad MLflow source {source!r}: expected models:/<name>@<alias>")


def fetch_mlflow(source: str, dest: Path, tracking_uri: str | None = None) -> Path:
    """Download a registry version (``models:/name@alias``, ``/<version>`` or ``/latest``) into
    ``dest``; ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = parse_models_uri(source)
    staging = None
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise WeightsNotFoundError(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
        log.info("%s -> version %s, source %s", source, mv.version, mv.source)
        staging = _staging(dest)
        mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(staging), tracking_uri=tracking_uri
        )
    except MlflowException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        uri = tracking_uri or mlflow.get_tracking_uri()
        raise WeightsNotFoundError(f"cannot resolve {source} at {uri}: {first_line(exc)}") from exc
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise WeightsNotFoundError(f"cannot download {source}: {first_line(exc)}") from exc
    return _finish(dest, source, staging)


# --------------------------------------------------------------------------------- entry
def resolve_source(source: str, dest: str | Path) -> Path:
    """A local diffusers folder for ``source`` (see the module docstring); raises
    :class:`WeightsNotFoundError` with a one-line message."""
    source = (source or "").strip()
    if not source:
        raise WeightsNotFoundError("no model source: set LUMINA_MODEL_SOURCE or pass --model / --source")
    dest = Path(dest).expanduser()
    if source.startswith(("models:/", "s3://")):
        cached = _cached(dest, source)
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
