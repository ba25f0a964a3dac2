"""Latent cache that scales: VAE latents precomputed once per (resolution, VAE) and stored as
safetensors files (bf16, one file per group of images, tensor key = image id) beside Parquet
indexes that say where each image's latent is.

Layout: ``<out_prefix>/latents-r<resolution>-<vae fingerprint>/<name>.safetensors`` and, written by
the caller with :func:`write_latent_index`, ``<name>.index.parquet`` in the same folder (columns
:data:`INDEX_COLUMNS`). Prefixes are local folders or ``s3://`` URIs (through :mod:`storage`).

:func:`build_latents` encodes one group of manifest rows (images read from their shards, resized to
the stage's aspect-ratio buckets exactly as :mod:`components.train.data` does) in batches, holding
at most one file's tensors in memory. :class:`LatentStore` serves latents by id lazily
(``safetensors.safe_open`` for local files; ``s3://`` files by byte ranges, a run of ids in one
read, never downloaded whole) as fp32;
training uses it through ``TrainConfig.latents`` (``--latents``).
"""

from components.latents.cache import (
    INDEX_COLUMNS,
    SAMPLE_COLUMNS,
    TIER_COLUMNS,
    LatentStore,
    build_latents,
    latent_dir,
    latent_file,
    latent_index_path,
    read_latent_index,
    write_latent_index,
)

__all__ = [
    "INDEX_COLUMNS",
    "SAMPLE_COLUMNS",
    "TIER_COLUMNS",
    "LatentStore",
    "build_latents",
    "latent_dir",
    "latent_file",
    "latent_index_path",
    "read_latent_index",
    "write_latent_index",
]
