"""Build, save and load whole pipelines in diffusers format.

A pipeline folder is what ``Lumina2Pipeline.save_pretrained`` writes (transformer, vae,
text_encoder, tokenizer, scheduler, model_index.json), so the released
``Alpha-VLLM/Lumina-Image-2.0`` folder loads unchanged from a hub id or a local path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
)

from common.errors import WeightsNotFoundError, first_line
from model.profiles import ModelProfile, get_profile
from model.text import build_text_encoder, train_tokenizer

log = logging.getLogger(__name__)


def zero_init_(transformer: Lumina2Transformer2DModel) -> None:
    """Zero the adaLN modulations and the final projection, as the official initialisation does.

    With these zeros every modulated block starts as the identity (tanh(0) gates) and the model
    predicts zero velocity until training moves them.
    """
    blocks = [*transformer.noise_refiner, *transformer.layers]
    for block in blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    norm_out = transformer.norm_out
    for linear in (norm_out.linear_1, norm_out.linear_2):
        torch.nn.init.zeros_(linear.weight)
        if linear.bias is not None:
            torch.nn.init.zeros_(linear.bias)


def build_transformer(
    profile: ModelProfile, seed: int = 0, zero_init: bool = True
) -> Lumina2Transformer2DModel:
    """A ``Lumina2Transformer2DModel`` of the profile's size, deterministic for a seed.

    ``zero_init=False`` keeps the default random init of the zeroed layers, which makes an
    untrained model produce non-trivial outputs (used by sampler tests and benchmarks).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Lumina2Transformer2DModel(**profile.transformer.model_dump())
    if zero_init:
        zero_init_(transformer)
    return transformer.eval()


def build_vae(profile: ModelProfile, seed: int = 0) -> AutoencoderKL:
    """The profile's 16-channel ``AutoencoderKL`` with FLUX scaling/shift, random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**profile.vae.diffusers_kwargs())
    return vae.eval()


def pipeline_vae(profile: str | ModelProfile, seed: int = 0, vae: str | Path | None = None) -> AutoencoderKL:
    """The VAE :func:`build_pipeline` puts into a pipeline built with ``seed`` (the latent cache
    builds it alone, without the transformer and the text encoder): the trained VAE in the folder
    ``vae`` when given (:mod:`model.vae_training`), else the profile's random-weight one."""
    if vae:
        return load_vae_folder(vae)
    profile = get_profile(profile) if isinstance(profile, str) else profile
    return build_vae(profile, seed=seed + 2)


def load_vae_folder(folder: str | Path) -> AutoencoderKL:
    """A 16-channel VAE saved with ``save_pretrained`` in ``folder``; one-line
    :class:`WeightsNotFoundError` when it is missing, incomplete or not a 16-channel VAE."""
    from model.profiles import LATENT_CHANNELS

    path = Path(str(folder)).expanduser()
    if not (path / "config.json").is_file():
        what = "not found" if not path.exists() else "not a diffusers VAE folder (no config.json)"
        raise WeightsNotFoundError(f"VAE folder {path}: {what}")
    try:
        vae = AutoencoderKL.from_pretrained(path).eval()
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsNotFoundError(f"cannot load the VAE in {path}: {first_line(exc)}") from exc
    if vae.config.latent_channels != LATENT_CHANNELS:
        raise WeightsNotFoundError(
            f"VAE in {path} has {vae.config.latent_channels} latent channels, not {LATENT_CHANNELS}"
        )
    return vae


def load_vae(source: str | Path) -> AutoencoderKL:
    """The VAE of a diffusers pipeline folder (its ``vae/``), of a VAE folder itself, or of a hub id
    (``subfolder="vae"``, from the local cache when offline); one-line error otherwise."""
    folder = Path(str(source)).expanduser()
    try:
        if (folder / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        if (folder / "config.json").is_file():
            return AutoencoderKL.from_pretrained(folder).eval()
        if folder.exists() or _looks_like_path(str(source)):
            raise WeightsNotFoundError(f"no VAE in {folder} (expected vae/config.json)")
        return AutoencoderKL.from_pretrained(str(source), subfolder="vae").eval()
    except (OSError, ValueError) as exc:
        raise WeightsNotFoundError(f"cannot load the VAE of {source}: {first_line(exc)}") from exc


def build_scheduler(profile: ModelProfile) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching scheduler config saved with the pipeline (static time shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=profile.scheduler_shift, use_dynamic_shifting=False
    )


def build_pipeline(
    profile: str | ModelProfile, seed: int = 0, zero_init: bool = True, vae: str | Path | None = None
) -> Lumina2Pipeline:
    """Build a complete random-weight pipeline for a profile, offline and deterministically.

    The tokenizer is trained locally; the ``full`` profile is meant to be loaded from the released
    weights instead (building it allocates 2.6B + 2.6B parameters). ``vae``: a folder with trained
    VAE weights (:func:`model.vae_training.trained_vae`) used instead of the random VAE.
    """
    profile = get_profile(profile) if isinstance(profile, str) else profile
    tokenizer = train_tokenizer(profile.text_encoder.tokenizer_vocab_size, seed=0)
    text_encoder = build_text_encoder(profile.text_encoder, vocab_size=len(tokenizer), seed=seed + 1)
    return Lumina2Pipeline(
        transformer=build_transformer(profile, seed=seed, zero_init=zero_init),
        scheduler=build_scheduler(profile),
        vae=pipeline_vae(profile, seed, vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def save_pipeline(pipe: Lumina2Pipeline, path: str | Path) -> Path:
    """Write the pipeline folder in diffusers format (safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


RAW_TRANSFORMER_DIR = "transformer_raw"
"""A stage export's raw (non-EMA) transformer, beside the pipeline's EMA components: what the next
stage starts from, as the official ``finetune.py --init_from`` loads the raw consolidated weights
(the EMA ``transformer/`` stays the model that is evaluated, registered and served)."""


def load_for_training(source: str | Path) -> Lumina2Pipeline:
    """The pipeline a stage starts from: ``source`` with its raw transformer when the folder has
    one (a previous stage's export), else as it is (released or registered weights)."""
    pipe = load_pipeline(source)
    raw = Path(str(source)).expanduser() / RAW_TRANSFORMER_DIR
    if (raw / "config.json").is_file():
        try:
            pipe.register_modules(transformer=Lumina2Transformer2DModel.from_pretrained(raw))
        except (OSError, ValueError) as exc:
            message = f"cannot load the raw transformer in {raw}: {first_line(exc)}"
            raise WeightsNotFoundError(message) from exc
    return pipe


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).exists() or source.count("/") != 1


def load_pipeline(
    source: str | Path,
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
) -> Lumina2Pipeline:
    """Load a diffusers-format Lumina2 pipeline from a local folder or a hub id.

    Raises :class:`WeightsNotFoundError` with a one-line message when the folder is missing or
    incomplete, or when the hub id cannot be resolved (e.g. offline without a cached copy).
    """
    source = str(source)
    kwargs: dict = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    if _looks_like_path(source):
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise WeightsNotFoundError(f"model folder not found: {folder}")
        if not (folder / "model_index.json").is_file():
            raise WeightsNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
        try:
            pipe = Lumina2Pipeline.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsNotFoundError(f"cannot load pipeline from {folder}: {first_line(exc)}") from exc
    else:
        try:
            pipe = Lumina2Pipeline.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsNotFoundError(
                f"cannot resolve hub id {source!r} (offline or not cached?): {first_line(exc)}"
            ) from exc
    if device is not None:
        pipe.to(device)
    pipe.tokenizer.padding_side = "right"
    return pipe
