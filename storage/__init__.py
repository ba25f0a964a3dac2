"""One storage layer for every step: ``s3://`` URIs and local paths behind the same functions.

The lowest layer of the project (it imports nothing of ours but :mod:`common.errors`): URI parsing,
the boto3 client built from the environment, listing, reads (whole or a byte range), atomic writes
and uploads. Components, training, registration and serving all go through it.
"""

from storage.io import (
    ObjectInfo,
    StorageError,
    download_file,
    exists,
    is_s3,
    join,
    list_objects,
    parse_s3,
    read_bytes,
    read_parquet,
    read_range,
    s3_client,
    upload_file,
    write_bytes,
    write_parquet,
)

__all__ = [
    "ObjectInfo",
    "StorageError",
    "download_file",
    "exists",
    "is_s3",
    "join",
    "list_objects",
    "parse_s3",
    "read_bytes",
    "read_parquet",
    "read_range",
    "s3_client",
    "upload_file",
    "write_bytes",
    "write_parquet",
]
