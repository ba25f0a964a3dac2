"""Model sources → a local diffusers folder (or a hub id): the serving fetch and the train step's
``base_model`` resolve through here.

- ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: an MLflow registered version
  (:mod:`storage.registry`);
- ``s3://bucket/prefix``: every object under the prefix (paginated);
- a local folder holding ``model_index.json`` (used in place);
- with ``hub=True``, a Hugging Face hub id (``owner/name``), returned as is for
  ``diffusers`` to load from its cache (offline: it must be cached).

Downloads land in ``dest`` and finish with a marker naming the source, so a second resolve of the
same source reuses the folder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from common.errors import WeightsNotFoundError, first_line
from storage.io import StorageError, download_file, list_objects, parse_s3, s3_client
from storage.registry import fetch_mlflow
from storage.staging import (
    MODEL_INDEX,
    abandon_staging,
    cached_download,
    download_lock,
    finish_staging,
    start_staging,
)

log = logging.getLogger(__name__)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
def fetch_vae(source: str, dest: str | Path) -> str:
    """What :func:`model.checkpoint.load_vae` needs of a model source, fetching no more than the
    VAE where it can: an ``s3://`` pipeline's ``vae/`` objects only (into ``dest/vae``); a registry
    version whole (its files are not addressable one by one here); a folder or hub id as is."""
    source, dest = (source or "").strip(), Path(dest)
    if source.startswith("s3://"):
        prefix = source.rstrip("/") + "/vae/"
        target = dest / "vae"
        try:
            for obj in list_objects(prefix):
                download_file(obj.uri, target / obj.uri[len(prefix) :])
        except StorageError as exc:
            raise WeightsNotFoundError(f"no VAE under {source}: {first_line(exc)}") from None
        return str(target)
    if source.startswith("models:/"):
        return str(resolve_source(source, dest))
    return source


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is not an existing path."""
    return bool(HUB_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def resolve_model(source: str, dest: str | Path) -> str:
    """:func:`resolve_source`, or a hub id as is (what ``base_model`` accepts)."""
    source = (source or "").strip()
    if is_hub_id(source):
        return source
    return str(resolve_source(source, dest))


def resolve_source(source: str, dest: str | Path) -> Path:
    """A local diffusers folder for ``source`` (see the module docstring); raises
    :class:`WeightsNotFoundError` with a one-line message."""
    source = (source or "").strip()
    if not source:
        raise WeightsNotFoundError("no model source: set LUMINA_MODEL_SOURCE or pass --model / --source")
    dest = Path(dest).expanduser()
    if source.startswith(("models:/", "s3://")):
        with download_lock(dest):  # concurrent fetches into one folder: one downloads, the rest reuse
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
