"""Train the small profiles' 16-channel VAE on the sample images, cached by the data's hash.

The ``tiny`` profile's ``AutoencoderKL`` (FLUX layout: 16 latent channels, f8, no quant convs)
would otherwise keep random weights, so every image it decodes is noise. :func:`train_vae` fits it
on the synthetic scenes (L1 + MSE on the posterior mean, a very small KL term) deterministically on
the CPU, sets ``scaling_factor`` / ``shift_factor`` from the training latents (unit variance, as
FLUX's values do for its VAE) and writes a diffusers VAE folder with ``report.json`` (held-out
PSNR, steps, data hash; no wall time, so the same data gives the same bytes). :func:`trained_vae`
reuses ``<cache>/<hash16>/`` when it is complete, else trains into a temporary folder and renames it
into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from common.errors import ConfigError
from model.profiles import get_profile

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
REPORT = "report.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EVAL_SIZES = (64, 128)  # the tiny profile's training resolutions


@dataclass(frozen=True)
class VaeTraining:
    """The recipe (part of the cache key: a changed recipe trains again)."""

    profile: str = "tiny"
    steps: int = 1400
    batch: int = 4
    crop: int = 64
    lr: float = 1e-3
    full_size_share: float = 0.5  # batches cropped from the 128 px images (the rest: 64 px)
    kl_weight: float = 1e-7
    # Reconstruction weight of the pixels that differ from their crop's median colour (the shapes:
    # ~15% of a scene), so the loss is not all background; their colours are what the scorer reads.
    foreground_weight: float = 4.0
    holdout: float = 0.1
    seed: int = 0
    threads: int = 2


def training_images(data_dir: str | Path) -> list[Path]:
    """The images a VAE trains on: ``<data_dir>/synthetic/`` when there is one (the sample data's
    root), else the images directly in ``data_dir``; sorted by name."""
    root = Path(data_dir)
    folder = root / "synthetic" if (root / "synthetic").is_dir() else root
    if not folder.is_dir():
        raise ConfigError(f"VAE training data not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ConfigError(f"VAE training needs at least 2 images in {folder} (found {len(files)})")
    return files


def data_hash(files: Sequence[Path], recipe: VaeTraining | None = None) -> str:
    """sha256 of the images' names and bytes (and of the recipe)."""
    digest = hashlib.sha256(json.dumps(asdict(recipe or VaeTraining()), sort_keys=True).encode())
    for file in files:
        digest.update(file.name.encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def is_held_out(name: str, fraction: float) -> bool:
    """~``fraction`` of the images, chosen by a hash of the image id (its file stem): stable when
    images are added or removed."""
    return int(hashlib.sha256(Path(name).stem.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def split(files: Sequence[Path], fraction: float) -> tuple[list[Path], list[Path]]:
    """(train, held out); both non-empty."""
    held = [f for f in files if is_held_out(f.name, fraction)]
    train = [f for f in files if not is_held_out(f.name, fraction)]
    if not held:
        held, train = [train[-1]], train[:-1]
    if not train:
        train, held = [held[0]], held[1:]
    return train, held


def load_pixels(files: Sequence[Path], size: int) -> torch.Tensor:
    """Images as ``(N, 3, size, size)`` in [-1, 1] (resized with antialiasing when needed)."""
    arrays = []
    for file in files:
        with Image.open(file) as img:
            img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(pixels), batch):
        x = pixels[i : i + batch]
        out.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1))
    return torch.cat(out)


def psnr(vae: AutoencoderKL, pixels: torch.Tensor) -> float:
    """Mean per-image PSNR (dB, pixels in [0, 1]) of encode → decode (posterior mode)."""
    vae.eval()
    mse = ((reconstruct(vae, pixels) - pixels) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """A fixed thread count and deterministic kernels for the ``with`` block (restored after)."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def _batches(
    sources: list[torch.Tensor], recipe: VaeTraining, gen: torch.Generator
) -> Iterator[torch.Tensor]:
    """Random ``crop``-pixel crops (8-aligned) of the images at each size, mirrored at random."""
    c = recipe.crop
    while True:
        full = len(sources) > 1 and bool(torch.rand(1, generator=gen) < recipe.full_size_share)
        src = sources[-1] if full else sources[0]
        x = src[torch.randint(len(src), (recipe.batch,), generator=gen)]
        side = x.shape[-1]
        ox, oy = (torch.randint(0, (side - c) // 8 + 1, (2,), generator=gen) * 8).tolist()
        x = x[:, :, oy : oy + c, ox : ox + c]
        if bool(torch.rand(1, generator=gen) < 0.5):
            x = x.flip(3)
        yield x


def pixel_weights(x: torch.Tensor, foreground: float, threshold: float = 0.1) -> torch.Tensor:
    """``(B, 1, H, W)`` loss weights: ``foreground`` where a pixel is more than ``threshold`` (in
    [-1, 1] units, summed over channels) from its image's median colour, else 1."""
    if foreground == 1.0:
        return torch.ones_like(x[:, :1])
    median = x.flatten(2).median(dim=2).values[:, :, None, None]
    away = (x - median).abs().sum(dim=1, keepdim=True) > threshold
    return 1.0 + (foreground - 1.0) * away.to(x.dtype)


def _latent_stats(vae: AutoencoderKL, sources: list[torch.Tensor]) -> tuple[float, float]:
    """(shift, scale) so that ``(z - shift) * scale`` has zero mean and unit variance."""
    with torch.no_grad():
        zs = [
            vae.encode(x[i : i + 16]).latent_dist.mode().flatten()
            for x in sources
            for i in range(0, len(x), 16)
        ]
    z = torch.cat(zs).double()
    return float(z.mean()), float(1.0 / z.std().clamp_min(1e-6))


def train_vae(files: Sequence[Path], out_dir: str | Path, recipe: VaeTraining | None = None) -> dict:
    """Train the profile's VAE on ``files`` into ``out_dir`` (diffusers folder + ``report.json``);
    returns the report and the training time (``seconds``, not written)."""
    from model.checkpoint import build_vae

    recipe = recipe or VaeTraining()
    files = sorted(files)
    train, held = split(files, recipe.holdout)
    out = Path(out_dir)
    started = time.perf_counter()
    with _deterministic(recipe.threads):
        torch.manual_seed(recipe.seed)
        vae = build_vae(get_profile(recipe.profile), seed=recipe.seed).train()
        sources = [load_pixels(train, size) for size in EVAL_SIZES]
        sources = [s for s in sources if s.shape[-1] >= recipe.crop]
        optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1
        )
        gen = torch.Generator().manual_seed(recipe.seed)
        batches = _batches(sources, recipe, gen)
        loss = torch.zeros(())
        for step in range(recipe.steps):
            if step and step % 200 == 0:
                log.info(
                    "VAE step %d/%d: loss %.4f (%.0f s)",
                    step,
                    recipe.steps,
                    float(loss.detach()),
                    time.perf_counter() - started,
                )
            x = next(batches)
            posterior = vae.encode(x).latent_dist
            error = vae.decode(posterior.mean).sample - x
            weight = pixel_weights(x, recipe.foreground_weight)
            loss = (weight * (error.abs() + error.square())).mean() + recipe.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
        vae.eval()
        train_seconds = time.perf_counter() - started
        shift, scale = _latent_stats(vae, sources)
        vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
        held_psnr = {str(size): round(psnr(vae, load_pixels(held, size)), 3) for size in EVAL_SIZES}
    report = {
        "psnr_db": min(held_psnr.values()),
        "psnr_db_by_size": held_psnr,
        "held_out": [f.stem for f in held],
        "train_images": len(train),
        "steps": recipe.steps,
        "final_loss": round(float(loss.detach()), 6),
        "data_hash": data_hash(files, recipe),
        "shift_factor": vae.config.shift_factor,
        "scaling_factor": vae.config.scaling_factor,
        "recipe": asdict(recipe),
    }
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")  # data and recipe only: see below
    log.info(
        "VAE: %.2f dB held-out PSNR after %d steps in %.0f s", report["psnr_db"], recipe.steps, train_seconds
    )
    # the wall time is returned and logged, not written: the folder is DVC-versioned data, and the
    # same data and recipe must give the same bytes (and data version) on every machine
    return {**report, "seconds": round(train_seconds, 1)}


def trained_vae(data_dir: str | Path, cache_dir: str | Path, recipe: VaeTraining | None = None) -> Path:
    """The VAE trained on ``data_dir``'s images: ``<cache_dir>/<hash16>/`` when it holds a complete
    one, else trained now and renamed into place (a partial folder is never used)."""
    recipe = recipe or VaeTraining()
    files = training_images(data_dir)
    key = data_hash(files, recipe)[:16]
    cache = Path(cache_dir)
    target = cache / key
    if (target / COMPLETE).is_file():
        log.info("VAE: reusing %s", target)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        train_vae(files, tmp, recipe)
        (tmp / COMPLETE).write_text(key + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier attempt
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_vae(folder: str | Path, data_dir: str | Path | None = None) -> Path | None:
    """The VAE folder ``folder`` stands for: itself when it holds a VAE (``config.json``), else the
    complete cache entry for ``data_dir``'s images (when given and present), else the most recently
    completed entry; None when it holds none."""
    root = Path(folder)
    if (root / "config.json").is_file():
        return root
    if data_dir is not None:
        with contextlib.suppress(ConfigError):
            entry = root / data_hash(training_images(data_dir))[:16]
            if (entry / COMPLETE).is_file():
                return entry
    done = [p.parent for p in root.glob(f"*/{COMPLETE}")]
    return max(done, key=lambda p: (p / COMPLETE).stat().st_mtime) if done else None
