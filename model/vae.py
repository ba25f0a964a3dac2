"""VAE helpers: images to normalised latents and back (FLUX scaling / shift from the config)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image


def images_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size → (B, 3, H, W) in [-1, 1]."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def encode_pixels(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] → normalised latents ``(mode - shift) * scale`` (as the official trainer)."""
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()


def encode_images(vae: AutoencoderKL, images: Sequence[Image.Image]) -> torch.Tensor:
    return encode_pixels(vae, images_to_tensor(images))


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents → pixels in [-1, 1]."""
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0].float()
