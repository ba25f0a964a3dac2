"""A tiny random-weight Qwen2-VL, built offline (no hub access), for tests, benchmarks and the offline
profile: a config, a byte-level BPE trained on a small bilingual corpus and random weights, saved in the
layout of a hub checkpoint so that :class:`components.recaption.vlm.VlmCaptioner` loads it like a real one.

It produces gibberish, so captioning with it normally yields empty captions and an error message; that
is expected (the parser never invents a caption).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.recaption.vlm import (
    DEFAULT_MIN_PIXELS,
    PATCH_FACTOR,
    PERSPECTIVE_PROMPTS,
    PROMPTS,
    CaptionerError,
    quiet_transformers,
)

__all__ = [
    "QWEN2_VL_CHAT_TEMPLATE",
    "QWEN2_VL_SPECIAL_TOKENS",
    "TINY_QWEN2VL_SPECS",
    "TinyQwen2VLSpec",
    "build_qwen2_tokenizer",
    "build_tiny_qwen2vl",
]

# The Qwen2-VL chat template (as shipped with Qwen/Qwen2-VL-*-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class TinyQwen2VLSpec:
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_depth: int
    vision_dim: int
    vision_heads: int
    vocab_size: int = 1024
    max_pixels: int = 16 * PATCH_FACTOR * PATCH_FACTOR  # the saved processor's default

    @property
    def mrope_section(self) -> list[int]:
        half = self.text_hidden // self.text_heads // 2  # rotary frequencies per head
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


TINY_QWEN2VL_SPECS = {
    "tiny": TinyQwen2VLSpec(64, 2, 4, 2, 128, vision_depth=2, vision_dim=32, vision_heads=2),
    "small": TinyQwen2VLSpec(256, 4, 8, 2, 768, vision_depth=4, vision_dim=128, vision_heads=4),
}


def _tokenizer_corpus() -> list[str]:
    lines = [*PROMPTS.values(), *PERSPECTIVE_PROMPTS.values()]
    try:
        from model.text import tokenizer_corpus

        lines += tokenizer_corpus(n_sentences=1500)
    except ImportError:  # pragma: no cover - the package is always installed with model/
        pass
    lines += [
        '{"detailed": "", "medium": "", "short": "", "tag": ["", ""]}',
        '{"style": "", "main_object": "", "objects": ["", ""], "attributes": "", "spatial": "",'
        ' "ocr": "none"}',
        "```json\n{}\n```",
    ]
    return lines


def build_qwen2_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE trained offline on a small bilingual corpus, as a ``Qwen2Tokenizer`` with the
    Qwen2-VL special tokens and chat template (``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=2,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True) for t in QWEN2_VL_SPECIAL_TOKENS]}
    )
    tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tok.padding_side = "left"
    tok.model_max_length = 32768
    return tok


def build_tiny_qwen2vl(
    path: str | Path, seed: int = 0, *, size: str = "tiny", max_pixels: int | None = None
) -> Path:
    """Save a random-weight Qwen2-VL (``size`` in :data:`TINY_QWEN2VL_SPECS`) with its processor in
    ``path``, loadable like a real checkpoint (``VlmCaptioner(path)``). Deterministic for a seed.
    ``max_pixels``: the saved processor's pixel budget (default: the spec's; the released models have
    12845056)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if size not in TINY_QWEN2VL_SPECS:
        choices = ", ".join(TINY_QWEN2VL_SPECS)
        raise CaptionerError(f"unknown tiny Qwen2-VL size {size!r} (choose from {choices})")
    spec = TINY_QWEN2VL_SPECS[size]
    path = Path(path)
    tokenizer = build_qwen2_tokenizer(spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    budget = spec.max_pixels if max_pixels is None else max_pixels
    image_processor = Qwen2VLImageProcessorPil(min_pixels=DEFAULT_MIN_PIXELS, max_pixels=budget)
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": spec.mrope_section,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": spec.vision_depth,
            "embed_dim": spec.vision_dim,
            "hidden_size": spec.text_hidden,
            "num_heads": spec.vision_heads,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    path.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(path)
        # The layout of a hub checkpoint: tokenizer files (with the chat template) + preprocessor_config.json.
        tokenizer.save_pretrained(path)
        image_processor.save_pretrained(path)
    return path
