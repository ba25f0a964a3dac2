"""A caption sidecar: one table of existing captions / alt text for a whole source.

Web-scale sets usually ship their alt text in one table (LAION-style parquet, a CSV export, a
JSON-lines dump) rather than a ``.txt`` beside every image. The table needs a key column (``file``,
``path``, ``key``, ``filename`` or ``image``) and a caption column (``caption``, ``alt_text`` or
``text``). A key matches an image by its path relative to the source (``sub/a.jpg``), that path
without its extension (``sub/a``, the WebDataset key), its file name (``a.jpg``) or its stem (``a``),
tried in that order. A sidecar caption takes precedence over a ``.txt`` beside the image.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from common.errors import ConfigError, first_line
from storage import StorageError, download_file

log = logging.getLogger(__name__)

KEY_COLUMNS = ("file", "path", "key", "filename", "image")
CAPTION_COLUMNS = ("caption", "alt_text", "text")


def _normalise(key: str) -> str:
    return key.strip().replace("\\", "/").removeprefix("./")


def candidate_keys(relative: str) -> list[str]:
    """The keys that may name the image at ``relative``: path, path without suffix, name, stem."""
    path = PurePosixPath(_normalise(relative))
    keys = [str(path), str(path.with_suffix("")), path.name, path.stem]
    return list(dict.fromkeys(keys))


def relative_source(source: str | Path, item_source: str) -> str:
    """``item_source`` (as ingest names it) relative to the ingested ``source``."""
    if "::" in item_source:  # a tar member: the name inside the shard
        return item_source.split("::", 1)[1]
    if item_source.startswith("s3://"):
        prefix = str(source).rstrip("/") + "/"
        return (
            item_source.removeprefix(prefix) if item_source.startswith(prefix) else item_source.split("/")[-1]
        )
    try:
        return Path(item_source).relative_to(Path(source)).as_posix()
    except ValueError:
        return Path(item_source).name


@dataclass
class CaptionSidecar:
    """Captions by key, and which keys have been used (to report rows that matched no image)."""

    path: str  # where it was read from (a local path or an s3:// URI)
    captions: dict[str, str]
    used: set[str] = field(default_factory=set)

    def lookup(self, relative: str) -> str | None:
        for key in candidate_keys(relative):
            if key in self.captions:
                self.used.add(key)
                return self.captions[key]
        return None

    @property
    def unmatched(self) -> int:
        return len(self.captions) - len(self.used)


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix == ".tsv":
            return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise ConfigError(f"caption sidecar {path} cannot be read: {first_line(exc)}") from exc
    raise ConfigError(f"caption sidecar {path}: unsupported format {suffix or '(none)'} "
                      "(use .csv, .tsv, .jsonl or .parquet)")  # fmt: skip


def _download(uri: str, folder: Path) -> Path:
    """Fetch an ``s3://`` sidecar through :mod:`storage` (endpoint from ``AWS_ENDPOINT_URL``)."""
    local = folder / PurePosixPath(uri).name
    try:
        return download_file(uri, local)
    except StorageError as exc:
        reason = str(exc).removeprefix(f"cannot download {uri}: ")
        raise ConfigError(f"caption sidecar {uri} cannot be fetched: {reason}") from exc


def load_sidecar(path: str | Path) -> CaptionSidecar:
    """Read a caption sidecar (a local file or ``s3://bucket/key``); a missing file, a table without
    the needed columns or a key given twice with different captions is a one-line :class:`ConfigError`."""
    if str(path).startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="sidecar-") as tmp:
            sidecar = load_sidecar(_download(str(path), Path(tmp)))
        sidecar.path = str(path)
        return sidecar
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"caption sidecar not found: {path}")
    table = _read_table(path)
    key_col = next((c for c in KEY_COLUMNS if c in table.columns), None)
    cap_col = next((c for c in CAPTION_COLUMNS if c in table.columns), None)
    if key_col is None or cap_col is None:
        raise ConfigError(
            f"caption sidecar {path} needs a key column ({', '.join(KEY_COLUMNS)}) and a caption column "
            f"({', '.join(CAPTION_COLUMNS)}); it has: {', '.join(map(str, table.columns)) or 'none'}"
        )
    captions: dict[str, str] = {}
    for key, caption in zip(table[key_col], table[cap_col], strict=True):
        if not isinstance(key, str) or not key.strip() or not isinstance(caption, str) or not caption.strip():
            continue  # a row without a key or text says nothing
        key = _normalise(key)
        if captions.get(key, caption.strip()) != caption.strip():
            raise ConfigError(f"caption sidecar {path}: key {key!r} has two different captions")
        captions[key] = caption.strip()
    log.info("caption sidecar %s: %d captions (key %r, caption %r)", path, len(captions), key_col, cap_col)
    return CaptionSidecar(str(path), captions)
