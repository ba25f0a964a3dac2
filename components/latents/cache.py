"""Build latent files (one safetensors file per group of images) and read them back by id."""

from __future__ import annotations

import json
import logging
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.errors import ConfigError
from components.train.data import bucket_sizes, fingerprint, load_image, measure_image, nearest_bucket
from model.vae import encode_pixels
from storage.io import is_s3, join, list_objects, read_parquet, read_range, upload_file, write_parquet
from storage.shards import iter_images

log = logging.getLogger(__name__)

INDEX_COLUMNS = ("id", "file", "key", "height", "width", "resolution", "vae_fingerprint")
# Carried from the manifest rows into the index when present: what training needs of a sample
# besides its latent (the streaming loader reads nothing else) and the tier flags of the stages.
SAMPLE_COLUMNS = ("captions", "domain")
# Carried when the rows have them: a grid row's Template C fill-ins (components.grids).
OPTIONAL_SAMPLE_COLUMNS = ("grid_fill",)
# One flag per stage: whether the stage trains on the row (unified: grids and the ordinary share).
TIER_COLUMNS = ("lowres", "highres", "hq", "unified")
CARRIED_COLUMNS = (*SAMPLE_COLUMNS, *OPTIONAL_SAMPLE_COLUMNS, *TIER_COLUMNS)  # rows -> index, when present
LATENT_DTYPE = torch.bfloat16


def latent_dir(out_prefix: str | Path, resolution: int, vae_fingerprint: str) -> str:
    """``<out_prefix>/latents-r<resolution>-<vae fingerprint>``: one folder per (resolution, VAE)."""
    return join(out_prefix, f"latents-r{resolution}-{vae_fingerprint}")


def latent_file(out_prefix: str | Path, resolution: int, vae_fingerprint: str, name: str) -> str:
    """The safetensors file of group ``name``."""
    return join(latent_dir(out_prefix, resolution, vae_fingerprint), f"{name}.safetensors")


def latent_index_path(out_prefix: str | Path, resolution: int, vae_fingerprint: str, name: str) -> str:
    """Where group ``name``'s index Parquet goes (beside its safetensors file)."""
    return join(latent_dir(out_prefix, resolution, vae_fingerprint), f"{name}.index.parquet")


def _empty_index() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("height", "width", "resolution") else object)
                         for c in INDEX_COLUMNS})  # fmt: skip


@torch.no_grad()
def build_latents(
    rows: pd.DataFrame,
    *,
    vae: torch.nn.Module,
    resolution: int,
    out_prefix: str | Path,
    name: str,
    batch_size: int = 8,
    image_root: Path | None = None,
    read_ahead: int = 16,
) -> pd.DataFrame:
    """Encode the images of manifest ``rows`` (``id`` and a shard ref or ``image_path``; optional
    ``width`` / ``height``) at ``resolution``'s buckets and write them as ONE bf16 safetensors file,
    ``<out_prefix>/latents-r<res>-<vae fingerprint>/<name>.safetensors`` (key = image id).

    Images are streamed (``read_ahead`` in flight) and encoded ``batch_size`` per bucket; only this
    group's latents are held. An unreadable image is logged and left out (training encodes it, or
    reports it). Returns the index frame (:data:`INDEX_COLUMNS`; ``height`` / ``width`` are the
    bucket's size in pixels), plus those of :data:`CARRIED_COLUMNS` that ``rows`` has."""
    vae_fp = fingerprint(vae)
    uri = latent_file(out_prefix, resolution, vae_fp, name)
    buckets = bucket_sizes(resolution)
    tensors: dict[str, torch.Tensor] = {}
    index: list[dict[str, Any]] = []
    pending: dict[tuple[int, int], list[tuple[dict[str, Any], torch.Tensor]]] = {}
    carried = [c for c in CARRIED_COLUMNS if c in rows.columns]

    def encode(size: tuple[int, int]) -> None:
        batch = pending.pop(size, [])
        if not batch:
            return
        z = encode_pixels(vae, torch.stack([pixels for _, pixels in batch]))
        for (row, _), zi in zip(batch, z, strict=True):
            rid = str(row["id"])
            tensors[rid] = zi.to("cpu", LATENT_DTYPE).contiguous().clone()
            index.append({"id": rid, "file": uri, "key": rid, "height": size[0], "width": size[1],
                          "resolution": resolution, "vae_fingerprint": vae_fp,
                          **{c: row[c] for c in carried}})  # fmt: skip

    seen: set[str] = set()
    records = rows.to_dict("records")
    for row, data in iter_images(records, read_ahead=read_ahead, root=image_root):
        rid = str(row["id"])
        if rid in seen:
            log.warning("latents %s: duplicate id %s left out", name, rid)
            continue
        if isinstance(data, str):
            log.warning("latents %s: image %s left out: %s", name, rid, data)
            continue
        seen.add(rid)
        try:
            width, height = row.get("width"), row.get("height")
            if not (_positive(width) and _positive(height)):
                width, height = measure_image(data)
            size = nearest_bucket(int(width), int(height), buckets)
            pixels = load_image(data, size)
        except (OSError, ValueError) as exc:  # PIL: not an image / truncated
            log.warning("latents %s: image %s left out: %s", name, rid, str(exc).splitlines()[0])
            continue
        pending.setdefault(size, []).append((row, pixels))
        if len(pending[size]) >= batch_size:
            encode(size)
    for size in list(pending):
        encode(size)
    if not tensors:
        log.warning("latents %s: no image could be encoded; nothing written", name)
        return _empty_index()
    with tempfile.TemporaryDirectory(prefix="latents-") as tmp:
        local = Path(tmp) / f"{name}.safetensors"
        metadata = {"resolution": str(resolution), "vae_fingerprint": vae_fp, "dtype": "bfloat16"}
        save_file(tensors, str(local), metadata=metadata)
        tensors.clear()
        upload_file(local, uri)
    log.info("latents %s: %d images -> %s", name, len(index), uri)
    # sorted by key: the file's tensor order (safetensors sorts by name), so rows that are together
    # in the index are together in the file and a loader unit is one range read
    frame = pd.DataFrame(index, columns=[*INDEX_COLUMNS, *carried])
    return frame.sort_values("key", kind="stable").reset_index(drop=True)


def _positive(value: Any) -> bool:
    try:
        return value is not None and not np.isnan(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def write_latent_index(frame: pd.DataFrame, uri: str | Path) -> str:
    """Write an index frame as Parquet (local or ``s3://``, atomically)."""
    return write_parquet(frame, uri)


def index_files(index: str | Path) -> list[str]:
    """The index Parquet files of a file, folder or ``s3://`` prefix, sorted (a stable order)."""
    files = sorted(o.uri for o in list_objects(index) if o.uri.endswith(".parquet"))
    if not files:
        raise ConfigError(f"no latent index (*.parquet) at {index}")
    return files


def read_index_columns(uri: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Those of ``columns`` an index file has (all when None); ``frame.attrs["names"]`` lists every
    column the file has. One clear error for an unreadable file."""
    try:
        if is_s3(uri):
            frame = read_parquet(uri)
            names = list(frame.columns)
            frame = frame if columns is None else frame[[c for c in columns if c in names]]
        else:
            names = pq.read_schema(uri).names
            chosen = [c for c in columns if c in names] if columns is not None else None
            frame = pd.read_parquet(uri, columns=chosen)
    except ConfigError:
        raise
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise ConfigError(f"cannot read latent index {uri}: {str(exc).splitlines()[0]}") from None
    frame.attrs["names"] = names
    return frame


def read_latent_index(path: str | Path) -> pd.DataFrame:
    """One index frame from a Parquet file or every ``*.parquet`` under a folder / ``s3://`` prefix."""
    frames = []
    for uri in index_files(path):
        frames.append(read_index_columns(uri))
        missing = [c for c in INDEX_COLUMNS if c not in frames[-1].columns]
        if missing:
            raise ConfigError(f"latent index {uri} lacks columns: {', '.join(missing)}")
    return pd.concat(frames, ignore_index=True)


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def safetensors_header(uri: str) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the tensor table) of a safetensors file, by two range reads."""
    size = int.from_bytes(read_range(uri, 0, 8), "little")
    table = json.loads(read_range(uri, 8, size))
    table.pop("__metadata__", None)
    return 8 + size, table


class LatentStore(Mapping[str, torch.Tensor]):
    """Latents by image id, read lazily from the safetensors files an index names (fp32 out).

    Local files are read in place (``safe_open``, at most ``max_open`` kept open, LRU). ``s3://``
    files are read by byte ranges, never downloaded whole: :meth:`read_many` fetches the tensors of
    a run of ids in one range read when they lie together in the file (an index is written sorted
    by key, which is the file's tensor order, so a loader unit is one read). Ids are looked up in a
    pandas index, not a dict of Python objects, so a large index stays compact."""

    def __init__(self, index: pd.DataFrame, max_open: int = 16) -> None:
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise ConfigError(f"latent index lacks columns: {', '.join(missing)}")
        frame = index.drop_duplicates("id", keep="last")
        self._ids = pd.Index(frame["id"].astype(str).to_numpy())
        codes, files = pd.factorize(frame["file"].astype(str))
        self._file_codes, self._files = codes, [str(f) for f in files]
        self._keys = frame["key"].astype(str).to_numpy()
        self._sizes = frame[["height", "width"]].to_numpy(dtype=np.int64)
        self.max_open = max(1, max_open)
        self._open: OrderedDict[int, Any] = OrderedDict()
        self._headers: OrderedDict[int, tuple[int, dict[str, Any]]] = OrderedDict()
        self.range_reads = 0  # s3 reads of tensor data (what a benchmark or test counts)

    @classmethod
    def from_index(cls, path: str | Path) -> LatentStore:
        """A store over an index Parquet or a folder / prefix of them."""
        return cls(read_latent_index(path))

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._ids

    def _position(self, key: str) -> int:
        if key not in self:
            raise KeyError(key)
        return int(self._ids.get_loc(key))

    def bucket(self, key: str) -> tuple[int, int]:
        """The (height, width) in pixels the image was encoded at."""
        h, w = self._sizes[self._position(key)]
        return int(h), int(w)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read_many([key])[0]

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def read_many(self, keys: Sequence[str]) -> list[torch.Tensor]:
        """The latents of ``keys`` (fp32, in order); per ``s3://`` file one range read when the
        tensors lie together (their span at most twice their size), else one read each."""
        positions = [self._position(k) for k in keys]
        out: dict[int, torch.Tensor] = {}
        by_file: dict[int, list[int]] = {}
        for pos in positions:
            by_file.setdefault(int(self._file_codes[pos]), []).append(pos)
        for code, members in by_file.items():
            uri = self._files[code]
            if not is_s3(uri):
                handle = self._handle(code)
                out.update({pos: handle.get_tensor(self._keys[pos]).float() for pos in members})
                continue
            base, table = self._header(code)
            entries = {pos: table[self._keys[pos]] for pos in members}
            spans = [e["data_offsets"] for e in entries.values()]
            lo, hi = min(b for b, _ in spans), max(e for _, e in spans)
            if hi - lo <= 2 * sum(e - b for b, e in spans):
                blob, origin = read_range(uri, base + lo, hi - lo), lo
                self.range_reads += 1
                out.update({pos: _tensor(blob, e, origin) for pos, e in entries.items()})
            else:
                for pos, e in entries.items():
                    begin, end = e["data_offsets"]
                    out[pos] = _tensor(read_range(uri, base + begin, end - begin), e, begin)
                    self.range_reads += 1
        return [out[pos] for pos in positions]

    def _header(self, code: int) -> tuple[int, dict[str, Any]]:
        if code not in self._headers:
            self._headers[code] = safetensors_header(self._files[code])
            while len(self._headers) > self.max_open:
                self._headers.popitem(last=False)
        return self._headers[code]

    def _handle(self, code: int):
        handle = self._open.get(code)
        if handle is None:
            handle = safe_open(self._files[code], framework="pt")
            self._open[code] = handle
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(code)
        return handle


def _tensor(blob: bytes, entry: dict[str, Any], origin: int) -> torch.Tensor:
    """One tensor of a safetensors table out of a blob read from data offset ``origin`` (fp32)."""
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ConfigError(f"latent tensor of unsupported dtype {entry['dtype']}")
    begin, end = entry["data_offsets"]
    raw = bytearray(blob[begin - origin : end - origin])
    return torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"]).float()
