"""Download an MLflow registry version (``models:/<name>@<alias>``, ``/<version>`` or ``/latest``).

The version's ``source`` artifacts are downloaded with ``mlflow.artifacts.download_artifacts``
(tracking server from ``tracking_uri``, default ``MLFLOW_TRACKING_URI``) into a staged ``dest``
(:mod:`storage.staging`). Used by the serving fetch and by registration alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common.errors import WeightsNotFoundError, first_line
from storage.staging import abandon_staging, finish_staging, start_staging

log = logging.getLogger(__name__)

SCHEME = "models:/"


def is_models_uri(source: str) -> bool:
    return str(source).startswith(SCHEME)


def parse_models_uri(source: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    rest = source[len(SCHEME) :].strip("/")
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
    """Download a registry version into ``dest`` and return the local pipeline folder;
    ``tracking_uri`` defaults to ``MLFLOW_TRACKING_URI``."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, version = parse_models_uri(source)
    dest = Path(dest)
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
        staging = start_staging(dest)
        mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source, dst_path=str(staging), tracking_uri=tracking_uri
        )
    except MlflowException as exc:
        abandon_staging(staging)
        uri = tracking_uri or mlflow.get_tracking_uri()
        raise WeightsNotFoundError(f"cannot resolve {source} at {uri}: {first_line(exc)}") from exc
    except OSError as exc:
        abandon_staging(staging)
        raise WeightsNotFoundError(f"cannot download {source}: {first_line(exc)}") from exc
    return finish_staging(dest, source, staging)
