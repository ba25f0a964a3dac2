"""Classifier-free guidance with the official CFG-Renorm and CFG-Trunc semantics."""

from __future__ import annotations

import torch


def renorm_guided(guided: torch.Tensor, cond: torch.Tensor, renorm: float) -> torch.Tensor:
    """Cap each sample's guided-velocity norm at ``renorm`` times its conditional norm.

    Official Lumina-Image 2.0 semantics: samples already under the cap are left unchanged
    (diffusers' ``cfg_normalization`` instead always rescales to the conditional norm).
    ``renorm <= 0`` disables the cap.
    """
    if renorm <= 0:
        return guided
    dims = tuple(range(1, guided.dim()))
    max_norm = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * renorm
    norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
    return guided * scale


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, renorm: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``, then CFG-Renorm."""
    return renorm_guided(uncond + scale * (cond - uncond), cond, renorm)


def cfg_active(t: float, guidance_scale: float, cfg_trunc: float) -> bool:
    """Whether a step starting at model time ``t`` (0 = noise) runs the unconditional branch.

    CFG-Trunc: guidance only while ``t < cfg_trunc`` (the early, structure-forming part of the
    trajectory); ``cfg_trunc >= 1`` never truncates. Scale 1 needs no unconditional pass at all.
    """
    return guidance_scale != 1.0 and t < cfg_trunc
