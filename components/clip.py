"""CLIP for scoring: CLIP score of generated images against their prompts (evaluation) and the
LAION improved-aesthetic predictor (an MLP on CLIP ViT-L/14 image embeddings, tiering).

Both run only when their weights are given (a hub id or local folder for CLIP, a ``.pth`` /
``.safetensors`` state dict for the MLP); nothing here downloads by itself. Tests use a tiny
random CLIP written by :func:`build_tiny_clip`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from common.errors import WeightsNotFoundError, first_line


class ClipScorer:
    """A CLIP model with its tokenizer and image processor (``transformers`` format)."""

    def __init__(self, source: str | Path, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.source = str(source)
        try:
            self.model = CLIPModel.from_pretrained(self.source).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            self.image_processor = AutoImageProcessor.from_pretrained(self.source)
        except (OSError, ValueError) as exc:
            raise WeightsNotFoundError(f"cannot load CLIP from {self.source!r}: {first_line(exc)}") from exc
        self.device = torch.device(device)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        feats = out if isinstance(out, torch.Tensor) else out.pooler_output
        return nn.functional.normalize(feats.float(), dim=-1)

    def clip_score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """CLIPScore (Hessel et al.) with w = 100: 100 · max(cos(image, prompt), 0) per pair."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return (100.0 * cos.clamp(min=0.0)).tolist()


class AestheticMLP(nn.Module):
    """The LAION improved-aesthetic-predictor head (``layers.*`` state dict keys)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class AestheticPredictor:
    """Aesthetic score (about 1–10 for the released weights) of images."""

    def __init__(self, clip: ClipScorer, mlp_weights: str | Path):
        path = Path(mlp_weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"aesthetic MLP weights not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.clip = clip
        self.mlp = AestheticMLP(clip.model.config.projection_dim).eval()
        try:
            self.mlp.load_state_dict(state)
        except RuntimeError as exc:
            raise WeightsNotFoundError(
                f"{path} is not an aesthetic MLP for this CLIP: {first_line(exc)}"
            ) from exc

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        return self.mlp(self.clip.image_embeds(images).cpu()).squeeze(-1).tolist()


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random CLIP (+ our offline tokenizer and a CLIP image processor) for tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from model.text import train_tokenizer

    torch.manual_seed(seed)
    tokenizer = train_tokenizer(vocab_size=512, seed=seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    out = Path(path)
    CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out
