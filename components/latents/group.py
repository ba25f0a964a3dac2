"""The per-group latent step of the pipeline: encode one plan group's tiered images at each
training stage's resolution with the stage VAE, into ``<group prefix>/latents-r<res>-<vae>/``.

Which images: the group's ``tiers.parquet`` (written by the tier fan-in): the ``lowres`` tier at
the first stage's resolution, the ``highres`` tier (⊇ ``hq``) at the high-resolution stages' one;
with the group's grid step output (``grids``, :mod:`components.grids.group`), also its grid rows at
the ``unified`` stage's resolution, and the ``unified`` flag on them and on the ordinary images of
the mix.
A group whose index for a (resolution, VAE) already holds every image wanted is not encoded again
(a retried or re-run task reuses it); a retry otherwise rewrites only this group's files. The index
always gets this run's captions, domain and tier flags (what the streaming training loader reads),
merged onto the latents by image id.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pandas as pd
import torch
from diffusers import AutoencoderKL

from common.errors import ConfigError
from components.grids.group import UNIFIED, unified_resolution, unified_rows
from components.latents.cache import (
    CARRIED_COLUMNS,
    INDEX_COLUMNS,
    TIER_COLUMNS,
    build_latents,
    latent_index_path,
    read_latent_index,
    write_latent_index,
)
from components.plan.plan import Group
from components.tier.tier import GROUP_TIERS_FILE
from components.train.config import STAGE_DEFAULTS, Stage
from components.train.data import fingerprint
from model.checkpoint import load_vae, pipeline_vae
from storage import exists, join, read_parquet
from storage.models import fetch_vae
from storage.shards import REF_COLUMNS

log = logging.getLogger(__name__)


def stage_resolutions(profile: str) -> dict[int, str]:
    """Resolution → the widest tier trained at it (lowres for stage 1, highres ⊇ hq after)."""
    wanted: dict[int, str] = {}
    if profile not in STAGE_DEFAULTS:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(STAGE_DEFAULTS)}")
    for stage in Stage:
        resolution = int(STAGE_DEFAULTS[profile][stage]["resolution"])
        wanted.setdefault(resolution, "lowres" if stage == Stage.LOWRES else "highres")
    return wanted


def stage_vae(profile: str, seed: int, base_model: str = "", vae: str = "") -> AutoencoderKL:
    """The VAE the first stage trains with: the base model's (``base_model``: a hub id, a folder,
    ``s3://`` or ``models:/``; only its ``vae/`` is fetched from S3), else the one
    :func:`model.checkpoint.build_pipeline` gives the stage for ``(profile, seed, vae)`` (``vae``: a
    trained VAE folder, "" for the profile's random one)."""
    if base_model and vae:
        raise ConfigError("base_model and vae exclude each other (the base model brings its own VAE)")
    if not base_model:
        return pipeline_vae(profile, seed, vae or None)
    with tempfile.TemporaryDirectory(prefix="base-vae-") as tmp:
        return load_vae(fetch_vae(base_model, tmp))


def _grid_rows(grids: pd.DataFrame) -> pd.DataFrame:
    """The grid rows as index rows: trained by the unified stage only."""
    rows = grids.copy()
    for column in TIER_COLUMNS:
        rows[column] = column == UNIFIED
    return rows


def latents_group(
    group: Group,
    out_dir: str | Path,
    *,
    profile: str = "tiny",
    seed: int = 0,
    base_model: str = "",
    vae: str = "",
    grids: str | Path | None = None,
) -> list[Path]:
    """Encode the group's tiered images with the first stage's VAE (:func:`stage_vae`); copy each
    index into ``out_dir`` (the KFP artifact) and return their paths. Training checks the VAE
    fingerprint and encodes itself on a mismatch. ``grids``: the group's grid step output (its
    folder or ``unified.parquet``): grid rows and the mix's flags at the unified resolution."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tiers = read_parquet(join(group.prefix, GROUP_TIERS_FILE))
    grid_rows, mixed = unified_rows(grids)
    unified_at = unified_resolution(profile) if grids is not None else None
    vae = stage_vae(profile, seed, base_model, vae)
    vae_fp = fingerprint(vae)
    if torch.cuda.is_available():  # a GPU task on a cluster (ClusterSettings.latents_gpus)
        vae = vae.to("cuda")
    written = []
    for resolution, tier in stage_resolutions(profile).items():
        rows = tiers[tiers[tier]] if tier in tiers else tiers.head(0)
        if resolution == unified_at:  # the unified phase: its grids, and its ordinary share flagged
            rows = tiers[tiers["id"].isin(rows["id"]) | tiers["id"].isin(mixed)].copy()
            rows[UNIFIED] = rows["id"].astype(str).isin(mixed)
            rows = pd.concat([rows, _grid_rows(grid_rows)], ignore_index=True)
        index_uri = latent_index_path(group.prefix, resolution, vae_fp, group.name)
        stored = read_latent_index(index_uri) if exists(index_uri) else None
        if stored is not None and set(rows["id"].astype(str)) <= set(stored["id"].astype(str)):
            log.info("latents %s r%d: reusing %d", group.name, resolution, len(stored))
            latents = stored[list(INDEX_COLUMNS)]
        else:
            latents = build_latents(
                rows[["id", "width", "height", "image_path", *REF_COLUMNS]],
                vae=vae, resolution=resolution, out_prefix=group.prefix, name=group.name,
            )  # fmt: skip
            log.info("latents %s r%d: %d images", group.name, resolution, len(latents))
        # the latents are reusable; captions, domain and tier flags are always this run's
        carried = [c for c in CARRIED_COLUMNS if c in rows.columns]
        index = latents.merge(rows[["id", *carried]].astype({"id": str}), on="id", how="inner")
        write_latent_index(index, index_uri)
        local = out / f"{group.name}-r{resolution}.index.parquet"
        index.to_parquet(local, index=False)
        written.append(local)
    return written
