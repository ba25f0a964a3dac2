"""Training configuration for one stage, with per-profile defaults from the paper's Table 3."""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.config_files import read_yaml_mapping
from common.errors import ConfigError, validation_message
from model.profiles import PROFILES
from model.prompts import DOMAIN_TEMPLATES, SystemPrompt


class Stage(StrEnum):
    LOWRES = "lowres"
    HIGHRES = "highres"
    HQ = "hq"
    UNIFIED = "unified"  # the extra fine-tuning phase on Template C grids (paper Sec. 4 and 5.1)


# The stages the paper's Table 3 lists, in order; ``unified`` follows them when turned on.
BASE_STAGES = (Stage.LOWRES, Stage.HIGHRES, Stage.HQ)


# Paper Table 3 (full profile, 32 A100s): resolution, steps, global batch, LR; the auxiliary
# 4x-pooled loss is used in the high-resolution stages.
PAPER_STAGES: dict[Stage, dict[str, Any]] = {
    Stage.LOWRES: {"resolution": 256, "steps": 144_000, "global_batch": 1024, "lr": 2e-4, "aux_weight": 0.0},
    Stage.HIGHRES: {"resolution": 1024, "steps": 40_000, "global_batch": 512, "lr": 2e-4, "aux_weight": 1.0},
    Stage.HQ: {"resolution": 1024, "steps": 15_000, "global_batch": 512, "lr": 2e-4, "aux_weight": 1.0},
    # Not in Table 3: the paper names the extra phase (Sec. 4) but gives no steps or batch. Ours:
    # the HQ stage's resolution, batch and LR, a third of its steps.
    Stage.UNIFIED: {"resolution": 1024, "steps": 5_000, "global_batch": 512, "lr": 2e-4, "aux_weight": 1.0},
}
for _stage in PAPER_STAGES.values():  # 110M images: no per-caption feature store (README, caption embeddings)
    _stage["text_features"] = "online"
    _stage["loader_workers"] = 4
    # a 2.6B checkpoint is ~47 GB: every 1,000 steps or 30 minutes, whichever comes first
    _stage["checkpoint_every"] = 1000
    _stage["checkpoint_minutes"] = 30.0

# Caption sampling weights per caption kind (see TrainConfig.granularity_weights: not from the paper).
DEFAULT_GRANULARITY_WEIGHTS: dict[str, float] = {
    "detailed": 1.0,
    "medium": 1.0,
    "short": 1.0,
    "tag": 0.5,
    "style": 0.5,
    "main_object": 0.5,
    "objects": 0.5,
    "attributes": 0.5,
    "spatial": 0.5,
    "ocr": 0.25,
}


# Scaled down so the four stages train on 2 CPU cores in about four minutes, and the tiny model
# learns the synthetic scenes (issue #12; the probes behind these numbers are in the README, "Does
# the embedded default learn?"). Not the paper's settings: no auxiliary loss (at 128 px the 4x-pooled
# latents are 2 x 2 tokens, which teach nothing the main term does not, for a second forward pass),
# a higher LR, and a caption mix that is mostly the English medium caption (a tiny model with a
# random text encoder learns one caption style far sooner than twenty; the other kinds and Chinese
# stay in at a small weight, and an image without a medium caption draws from its own kinds).
TINY_SHARED: dict[str, Any] = {  # every tiny stage: caption mix, checkpoints, stage checks
    "granularity_weights": {**dict.fromkeys(DEFAULT_GRANULARITY_WEIGHTS, 0.01), "medium": 1.0},
    "language_weights": {"en": 1.0, "zh": 0.05},
    "checkpoint_every": 250,
    "val_prompts": 64,  # each stage's check on the evaluate step's 64 prompts: ~1 s per 16 at 128 px
    "val_resolution": 128,  # every stage checked where the evaluate step scores (EvalConfig 128 px)
    # train at the sampler's static shift (profile.scheduler_shift = 6): the official shift is
    # resolution-dependent and meant for 256-4096 tokens; at the tiny profile's 16-64 tokens it is
    # 1.6, and the model rarely sees the noise levels where the sampler lays out the scene
    "time_shift": PROFILES["tiny"].scheduler_shift,
}
TINY_STAGES: dict[Stage, dict[str, Any]] = {
    # 1,900 + 1,000 steps: the budget's last ~40 s (usual host); on the pipeline's tiers they scored
    # presence 0.61 / 0.44 (seeds 0 / 1) after stage 2, against 0.47 / 0.33 for 1,400 + 800 (README)
    Stage.LOWRES: {"resolution": 64, "steps": 1900, "global_batch": 16, "lr": 2e-3, "aux_weight": 0.0},
    Stage.HIGHRES: {"resolution": 128, "steps": 1000, "global_batch": 16, "lr": 1e-3, "aux_weight": 0.0},
    Stage.HQ: {"resolution": 128, "steps": 100, "global_batch": 16, "lr": 2e-4, "aux_weight": 0.0},
    # a quarter of the HQ stage's LR: at 2e-4 the 30 steps on grids (2x2 panels of 4 x 4 tokens)
    # lowered presence on the scenes by 0.04-0.08 in three seeds and taught the panels nothing
    # measurable; at 5e-5 by 0.01-0.02 (README, "Does the embedded default learn?")
    Stage.UNIFIED: {"resolution": 128, "steps": 30, "global_batch": 8, "lr": 5e-5, "aux_weight": 0.0},
}
for _stage in TINY_STAGES.values():
    _stage.update(TINY_SHARED)

SMALL_STAGES: dict[Stage, dict[str, Any]] = {
    Stage.LOWRES: {"resolution": 128, "steps": 2000, "global_batch": 64, "lr": 5e-4, "aux_weight": 0.0},
    Stage.HIGHRES: {"resolution": 256, "steps": 1000, "global_batch": 32, "lr": 2e-4, "aux_weight": 1.0},
    Stage.HQ: {"resolution": 256, "steps": 500, "global_batch": 32, "lr": 2e-4, "aux_weight": 1.0},
    Stage.UNIFIED: {"resolution": 256, "steps": 300, "global_batch": 32, "lr": 2e-4, "aux_weight": 1.0},
}

STAGE_DEFAULTS = {"tiny": TINY_STAGES, "small": SMALL_STAGES, "full": PAPER_STAGES}
# Default micro batch per profile (at most; a divisor of the global batch). The tiny model is so
# small that on a CPU each forward/backward costs about the same for 4 or 16 samples, so its whole
# batch goes in one pass; the larger profiles accumulate micro batches of 4 to bound activations.
MICRO_BATCH_CAP = {"tiny": 16, "small": 4, "full": 4}


class TrainConfig(BaseModel):
    """Everything one stage run needs. Unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage = Stage.LOWRES
    profile: str = "tiny"
    manifest: Path
    output_dir: Path
    image_root: Path | None = Field(
        None, description="root for relative image paths (default: manifest folder)"
    )
    init_from: Path | None = Field(None, description="diffusers folder of the previous stage")
    vae: Path | None = Field(
        None,
        description="trained VAE folder (model.vae_training) for a stage without init_from (a stage"
        " with init_from keeps that pipeline's VAE); None: the profile's random-weight VAE",
    )
    cache_dir: Path | None = Field(None, description="latent/text cache; default output_dir/../cache")
    latents: Path | None = Field(
        None,
        description="latent index (Parquet or folder of them, components.latents): latents at this"
        " resolution for this VAE are read from its safetensors files instead of encoded",
    )
    text_features: Literal["cache", "online"] = Field(
        "cache",
        description="cache: Gemma features of every caption variant computed once at the start of the"
        " stage (small datasets); online: captions encoded in each training step (the paper's scale:"
        " no per-variant feature store; see README 'Caption embeddings')",
    )
    loader_workers: int = Field(
        1, ge=0, description="loader worker processes per rank reading latent units ahead (0: in the step)"
    )
    loader_unit: int = Field(
        256, ge=1, description="samples per loader unit (the unit of reading and of memory)"
    )
    collective_timeout_minutes: float = Field(
        30.0,
        gt=0,
        description="a collective waiting longer fails the rank (a lost node ends the job, which"
        " the runtime restarts from the last complete checkpoint, instead of hanging it)",
    )
    resolution: int = Field(64, ge=64)
    steps: int = Field(100, ge=1)
    global_batch: int = Field(16, ge=1)
    micro_batch: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    # AdamW eps and the per-step EMA decay follow the official trainer where the paper is silent:
    # Alpha-VLLM/Lumina-Image-2.0 finetune.py L463 `AdamW(..., eps=1e-15, betas=(0.9, 0.95))` and
    # L146 `update_ema(ema_model, model, decay=0.95)`, called every step (L725) with the default.
    eps: float = 1e-15
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    ema_decay: float = Field(0.95, ge=0.0, lt=1.0)
    # The official trainer keeps the LR constant (finetune.py: no scheduler), and so do the profiles'
    # stages (on the tiny profile a cosine anneal scored lower: README "Does the embedded default
    # learn?"); a warmup or an anneal is for fine-tuning released weights. A torch LambdaLR that
    # DeepSpeed steps with the optimiser (trainer.lr_factor): its state is in every checkpoint.
    lr_schedule: Literal["constant", "cosine", "wsd"] = Field(
        "constant",
        description="constant: the LR after warmup; cosine: annealed to lr x min_lr_ratio; wsd "
        "(warmup-stable-decay): constant, then linear down to lr x min_lr_ratio over the last "
        "decay_fraction of the steps",
    )
    warmup_steps: int = Field(
        0, ge=0, description="steps of linear warmup from 0 to lr (0: none; at most the stage's steps)"
    )
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine / wsd: the last step's LR / lr")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: the share of steps that decays")
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0)
    aux_weight: float = Field(0.0, ge=0.0)
    system_prompts: dict[str, SystemPrompt] = Field(default_factory=lambda: dict(DOMAIN_TEMPLATES))
    # Relative weight of each caption kind when a training caption is drawn (components.train.data.
    # choose_caption): the four UniCap lengths and the six perspectives. The paper trains on UniCap's
    # multi-granularity, multi-perspective captions but publishes no sampling weights; these are ours:
    # the lengths equally (tags, word lists, half), the perspectives half (each covers one aspect of the
    # image, not the whole scene), the visible text a quarter (often absent, and its "none" answer is
    # never drawn). A config's weights update these (a kind it does not name keeps its default; 0 turns
    # a kind off); a kind unknown here weighs 1.
    granularity_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_GRANULARITY_WEIGHTS),
        description="caption kind -> sampling weight (lengths and UniCap perspectives; given weights"
        " update the defaults; unknown kinds: 1)",
    )
    language_weights: dict[str, float] = {"en": 1.0, "zh": 0.5}
    timestep_sampling: Literal["lognorm", "uniform"] = "lognorm"
    time_shift: float | None = Field(
        None,
        gt=0.0,
        description="a static shift of the training times towards noise (SD3-style s); "
        "None: the official resolution-dependent shift (mu linear in the image token count)",
    )
    seed: int = 0
    zero_stage: int = Field(1, ge=0, le=3)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)
    checkpoint_minutes: float | None = Field(
        None, gt=0, description="also checkpoint once this many minutes passed since the last checkpoint"
    )
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept (older ones are deleted)")
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0, description="sample grid every K steps (0: only at the end)")
    track: bool = Field(True, description="log to MLflow (MLFLOW_TRACKING_URI or sqlite beside outputs)")
    sample_prompts: list[str] = ["a red circle on the left of a blue square", "two yellow stars"]
    heldout: Path | None = Field(
        None,
        description="held-out manifest (the tier step's heldout.parquet, or its folder): the EMA"
        " export's validation loss on it is logged as val_loss at the end of the stage",
    )
    val_images: int = Field(32, ge=1, description="held-out images the stage's val_loss uses at most")
    val_seed: int = Field(0, description="noise seed of val_loss (fixed: stages are comparable)")
    val_granularity: str = Field("short", description="caption kind of val_loss (its first English one)")
    val_prompts: int = Field(
        32,
        ge=0,
        description="held-out synthetic prompts the stage's compositional scores (val_colors,"
        " val_presence, val_counting, val_position) are measured on; 0: off",
    )
    val_resolution: int | None = Field(
        None,
        ge=64,
        multiple_of=16,  # the sampler's grid: VAE factor 8 x patch 2 (checked before training, not after)
        description="resolution the compositional check samples and scores at; None: the stage's."
        " One value for every stage makes the stages' scores comparable across a resolution change",
    )

    @field_validator("granularity_weights")
    @classmethod
    def _caption_weights(cls, value: dict[str, float]) -> dict[str, float]:
        negative = sorted(k for k, w in value.items() if w < 0)
        if negative:
            raise ValueError(f"caption weights must be >= 0 ({', '.join(negative)})")
        return {**DEFAULT_GRANULARITY_WEIGHTS, **value}

    @model_validator(mode="after")
    def _check_batches(self) -> TrainConfig:
        if self.resolution % 64:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 64")
        if self.vae is not None and self.init_from is not None:
            raise ValueError("vae is for a stage without init_from (it keeps that pipeline's VAE)")
        return self

    def gradient_accumulation(self, world_size: int) -> int:
        """Micro-steps per optimiser step so that micro x accumulation x world = global batch."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"global batch {self.global_batch} is not divisible by micro batch {self.micro_batch}"
                f" x {world_size} processes"
            )
        return self.global_batch // per_step

    @property
    def resolved_cache_dir(self) -> Path:
        return self.cache_dir or self.output_dir.parent / "cache"


def stage_config(stage: str | Stage, profile: str = "tiny", **overrides: Any) -> TrainConfig:
    """The stage's defaults for a profile, with overrides (e.g. manifest, output_dir)."""
    from model.profiles import get_profile

    get_profile(profile)
    try:
        stage = Stage(stage)
    except ValueError:
        raise ConfigError(
            f"unknown stage {stage!r}; choose one of: {', '.join(s.value for s in Stage)}"
        ) from None
    values = {"stage": stage, "profile": profile, **STAGE_DEFAULTS[profile][stage], **overrides}
    # the largest divisor of the global batch up to the profile's cap: no accumulation remainder
    values.setdefault("micro_batch", math.gcd(values["global_batch"], MICRO_BATCH_CAP[profile]))
    return _validated(values)


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a YAML stage config (``stage`` and ``profile`` select the defaults)."""
    raw = read_yaml_mapping(path, "config file")
    raw.update(overrides)
    return stage_config(raw.pop("stage", Stage.LOWRES), raw.pop("profile", "tiny"), **raw)


def _validated(values: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(f"training config: {validation_message(exc, 'config')}") from None
