"""Model profiles: the sizes of Unified Next-DiT, its Gemma2 text encoder and its 16-channel VAE.

``tiny`` is for tests and the embedded default (trains in minutes on 2 CPU cores), ``small`` has
~45M transformer parameters for CPU benchmarks, ``full`` is the paper's 2.6B configuration. The
transformer is diffusers' ``Lumina2Transformer2DModel``; ``full`` matches the released
Alpha-VLLM/Lumina-Image-2.0 weights (Gemma-2-2B encoder, FLUX VAE).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.errors import ConfigError

# FLUX VAE latent normalisation (the official trainer and diffusers use these values).
FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159
VAE_DOWNSAMPLE = 8
LATENT_CHANNELS = 16


class TransformerSpec(BaseModel):
    """Arguments of ``Lumina2Transformer2DModel``."""

    model_config = ConfigDict(frozen=True)

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = LATENT_CHANNELS
    hidden_size: int
    num_layers: int
    num_refiner_layers: int
    num_attention_heads: int
    num_kv_heads: int
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    scaling_factor: float = 1.0
    axes_dim_rope: tuple[int, int, int]
    axes_lens: tuple[int, int, int] = (300, 512, 512)
    cap_feat_dim: int


class TextEncoderSpec(BaseModel):
    """A Gemma2 text encoder; ``tokenizer`` is ``local`` (trained offline) or a hub id / path."""

    model_config = ConfigDict(frozen=True)

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int | None = None  # None: size of the locally trained tokenizer
    max_position_embeddings: int = 8192
    sliding_window: int = 4096
    query_pre_attn_scalar: int | None = None  # None: head_dim
    tokenizer_vocab_size: int = 2048


class VaeSpec(BaseModel):
    """Arguments of the 16-channel ``AutoencoderKL`` (FLUX layout: no quant convs)."""

    model_config = ConfigDict(frozen=True)

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool = True

    def diffusers_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * n,
            "up_block_types": ("UpDecoderBlock2D",) * n,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "latent_channels": LATENT_CHANNELS,
            "norm_num_groups": self.norm_num_groups,
            "scaling_factor": FLUX_VAE_SCALING,
            "shift_factor": FLUX_VAE_SHIFT,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "mid_block_add_attention": self.mid_block_add_attention,
            "force_upcast": True,
        }


class ModelProfile(BaseModel):
    """One named model size: transformer, text encoder, VAE and sampling defaults."""

    model_config = ConfigDict(frozen=True)

    name: str
    transformer: TransformerSpec
    text_encoder: TextEncoderSpec
    vae: VaeSpec
    resolution: int = Field(description="default square resolution in pixels")
    scheduler_shift: float = 6.0
    # TeaCache rescale polynomial (highest power first). For `full` these are the public
    # TeaCache4Lumina2 coefficients; the random-weight profiles start from identity and are
    # meant to be calibrated with `lumina calibrate-teacache`.
    teacache_coefficients: tuple[float, ...] = (0.0, 0.0, 0.0, 1.0, 0.0)


PROFILES: dict[str, ModelProfile] = {
    "tiny": ModelProfile(
        name="tiny",
        # 2 x 2 patches as in the paper. With 1 x 1 (one token per latent pixel) the same model
        # draws the synthetic scenes far better on the scenes alone (held-out presence 0.39-0.70 after
        # stages 1 + 2, against 0.20-0.41), at about twice the cost of a 128 px step, but not in the
        # pipeline's data mix within its budget (README "Does the embedded default learn?").
        transformer=TransformerSpec(
            sample_size=16,
            hidden_size=64,
            num_layers=2,
            num_refiner_layers=1,
            num_attention_heads=4,
            num_kv_heads=2,
            multiple_of=32,
            axes_dim_rope=(4, 6, 6),
            axes_lens=(300, 128, 128),
            cap_feat_dim=64,
        ),
        # One layer: the transformer reads the second-to-last hidden state (as from Gemma-2-2B), which
        # here is the token embeddings. A frozen *random* attention layer before it would blend every
        # caption word with the ~20-token system prompt ahead of it, and the tiny model then barely
        # learns which colour or shape a prompt names (README "Does the embedded default learn?").
        text_encoder=TextEncoderSpec(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=512,
            sliding_window=256,
        ),
        # wide enough to reconstruct the synthetic scenes at >= 25 dB once trained (model.vae_training);
        # on the CPU it encodes / decodes as fast as (8, 16, 16, 16), which never got past ~19 dB
        vae=VaeSpec(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
        resolution=64,
    ),
    "small": ModelProfile(
        name="small",
        transformer=TransformerSpec(
            sample_size=32,
            hidden_size=512,
            num_layers=6,
            num_refiner_layers=2,
            num_attention_heads=8,
            num_kv_heads=4,
            multiple_of=256,
            axes_dim_rope=(16, 24, 24),
            axes_lens=(300, 256, 256),
            cap_feat_dim=256,
        ),
        text_encoder=TextEncoderSpec(
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=1024,
            sliding_window=512,
            tokenizer_vocab_size=4096,
        ),
        vae=VaeSpec(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=16),
        resolution=256,
    ),
    "full": ModelProfile(
        name="full",
        transformer=TransformerSpec(
            sample_size=128,
            hidden_size=2304,
            num_layers=26,
            num_refiner_layers=2,
            num_attention_heads=24,
            num_kv_heads=8,
            multiple_of=256,
            axes_dim_rope=(32, 32, 32),
            axes_lens=(300, 512, 512),
            cap_feat_dim=2304,
        ),
        # Gemma-2-2B.
        text_encoder=TextEncoderSpec(
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            vocab_size=256000,
            query_pre_attn_scalar=256,
        ),
        # FLUX.1 VAE.
        vae=VaeSpec(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        resolution=1024,
        teacache_coefficients=(393.76566581, -603.50993606, 209.10239044, -23.00726601, 0.86377344),
    ),
}


def get_profile(name: str) -> ModelProfile:
    """Return the profile called ``name`` or raise a one-line :class:`ConfigError`."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown model profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
