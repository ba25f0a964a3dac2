"""URIs, the S3 client and the operations every step needs, for ``s3://`` and local paths alike.

S3: boto3, endpoint from ``AWS_ENDPOINT_URL`` (MinIO, a loopback ``moto_server``), region from
``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (else ``us-east-1``), credentials the usual AWS way.
Every failure a user can fix (a bucket or prefix that is not there or not readable, a missing
file) is a :class:`StorageError` with a one-line message, never a botocore traceback.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import ConfigError, first_line

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_REGION = "us-east-1"


class StorageError(ConfigError):
    """A location that cannot be read or written (one line, names the URI)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its URI, size and a change token (S3 ETag, or the file's mtime_ns)."""

    uri: str
    size: int
    version: str


def is_s3(uri: str | Path) -> bool:
    return str(uri).startswith("s3://")


def parse_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> (bucket, key); a URI without a bucket is a StorageError."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"bad S3 URI {uri!r}: expected s3://bucket/prefix")
    return bucket, key


def join(base: str | Path, *parts: str) -> str:
    """``base`` / parts for either kind of location (S3 keys always use ``/``)."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(base).joinpath(*parts))


def s3_client(endpoint: str | None = None):
    """The boto3 S3 client every part of the project uses (endpoint default ``AWS_ENDPOINT_URL``)."""
    import boto3

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or DEFAULT_REGION
    return boto3.client("s3", endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL") or None,
                        region_name=region)  # fmt: skip


def _s3_error(uri: str, exc: Exception, doing: str) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    reason = {
        "NoSuchBucket": "the bucket does not exist",
        "NoSuchKey": "no such object",
        "404": "no such object",
        "AccessDenied": "access denied",
        "403": "access denied",
        "InvalidAccessKeyId": "the access key is not valid",
        "SignatureDoesNotMatch": "the secret key does not match",
    }.get(code, first_line(exc))
    return StorageError(f"cannot {doing} {uri}: {reason}")


def _boto_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def list_objects(uri: str | Path, *, must_exist: bool = True) -> Iterator[ObjectInfo]:
    """Every file under a folder / ``s3://`` prefix (or the one file named), sorted by URI.

    ``must_exist``: a location with nothing under it is a StorageError (an empty or mistyped prefix),
    else it lists nothing."""
    uri = str(uri)
    if not is_s3(uri):
        root = Path(uri)
        if root.is_file():
            yield ObjectInfo(str(root), root.stat().st_size, str(root.stat().st_mtime_ns))
            return
        if not root.is_dir():
            if must_exist:
                raise StorageError(f"not found: {uri}")
            return
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            stat = path.stat()
            yield ObjectInfo(str(path), stat.st_size, str(stat.st_mtime_ns))
        return
    bucket, prefix = parse_s3(uri)
    client = s3_client()
    found = False
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue
                found = True
                yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), obj["ETag"].strip('"'))
    except _boto_errors() as exc:
        raise _s3_error(uri, exc, "list") from None
    if not found and must_exist:
        raise StorageError(f"nothing under {uri} (an empty or mistyped prefix?)")


def exists(uri: str | Path) -> bool:
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    bucket, key = parse_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except _boto_errors():
        return False


def read_bytes(uri: str | Path) -> bytes:
    uri = str(uri)
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or first_line(exc)}") from None
    bucket, key = parse_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except _boto_errors() as exc:
        raise _s3_error(uri, exc, "read") from None


def read_range(uri: str | Path, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` (a member of a tar shard) without reading the rest."""
    uri = str(uri)
    if not is_s3(uri):
        try:
            with open(uri, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or first_line(exc)}") from None
    else:
        bucket, key = parse_s3(uri)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")
            data = body["Body"].read()
        except _boto_errors() as exc:
            raise _s3_error(uri, exc, "read") from None
    if len(data) != size:
        raise StorageError(f"truncated: {uri} has {len(data)} of {size} bytes at offset {offset}")
    return data


def write_bytes(uri: str | Path, data: bytes) -> str:
    """Write atomically: a reader sees the old object or the whole new one, never a part."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except _boto_errors() as exc:
            raise _s3_error(uri, exc, "write") from None
        return uri
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
    Path(tmp.name).replace(path)
    return uri


def upload_file(local: str | Path, uri: str | Path) -> str:
    """Copy a finished local file to ``uri`` (atomic for both kinds)."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            s3_client().upload_file(str(local), bucket, key)
        except _boto_errors() as exc:
            raise _s3_error(uri, exc, "write") from None
        return uri
    path = Path(uri)
    if Path(local).resolve() == path.resolve():
        return uri
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.copyfile(local, tmp)
    tmp.replace(path)
    return uri


def download_file(uri: str | Path, local: str | Path) -> Path:
    """Copy ``uri`` to the local file ``local`` (written under a temporary name, then renamed)."""
    uri, local = str(uri), Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.partial")
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            s3_client().download_file(bucket, key, str(tmp))
        except _boto_errors() as exc:
            tmp.unlink(missing_ok=True)
            raise _s3_error(uri, exc, "download") from None
    else:
        try:
            shutil.copyfile(uri, tmp)
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror or first_line(exc)}") from None
    tmp.replace(local)
    return local


def read_parquet(uri: str | Path) -> pd.DataFrame:
    """A Parquet table from a local path or an ``s3://`` object (manifests, listings, indexes)."""
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(uri)))


def write_parquet(frame: pd.DataFrame, uri: str | Path) -> str:
    """Write ``frame`` as Parquet to ``uri`` atomically (see :func:`write_bytes`)."""
    return write_bytes(uri, frame.to_parquet(index=False))
