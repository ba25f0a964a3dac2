"""Text side: Gemma tokenizer (hub / local, or trained offline for the random-weight profiles),
Gemma2 text encoder, and prompt encoding (second-to-last hidden state, at most 256 tokens)."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from model.profiles import TextEncoderSpec

MAX_TEXT_TOKENS = 256
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

_COLORS = """red orange yellow green blue purple pink brown black white gray silver gold cyan""".split()
_OBJECTS = """
person bicycle car motorcycle airplane bus train truck boat bird cat dog horse sheep cow elephant
bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard ball kite bottle
cup fork knife spoon bowl banana apple sandwich orange broccoli carrot pizza donut cake chair couch
bed table toilet tv laptop mouse remote keyboard phone microwave oven sink book clock vase scissors
teddy toothbrush circle square triangle star heart cube sphere
""".split()
_COUNTS = """one two three four five six seven eight a an the some many several""".split()
_RELATIONS = """
on the left of|on the right of|above|below|next to|in front of|behind|near|inside|on top of
""".strip().split("|")
_SIDES = ("left", "right", "top", "bottom")
_STYLES = """
photo painting illustration sketch watercolor render cartoon minimalist realistic detailed close-up
portrait landscape background scene image picture bright dark soft sharp vivid
""".split()
_ZH = """
红色 橙色 黄色 绿色 蓝色 紫色 粉色 棕色 黑色 白色 灰色 一个 两个 三个 四个 五个 的 在 左边 右边 上面 下面
旁边 图片 照片 画 风格 背景 猫 狗 鸟 马 汽车 飞机 苹果 香蕉 杯子 桌子 椅子 书 花 树 天空 人 房子 圆形 方形
三角形 星星 简单 详细 明亮 柔和
""".split()


TEMPLATE_REPEATS = 8
"""How often the system prompts are in the tokenizer's corpus. Every caption the model sees starts
with one. Seen once, as before (a BPE merge needs two occurrences), Template A's sentence took 43
tokens, 72 with a scene caption; repeated, its words are whole tokens: 15, and 34 with the caption.
The tiny model's training steps got 25 % (64 px) and 11 % (128 px) cheaper (README, issue #12)."""


def tokenizer_corpus(n_sentences: int = 4000, seed: int = 0) -> list[str]:
    """A deterministic bilingual corpus covering the words our captions and templates use."""
    from model.prompts import TEMPLATES

    rng = random.Random(seed)
    lines = [*TEMPLATES.values(), "<Prompt Start>"] * TEMPLATE_REPEATS
    for _ in range(n_sentences):
        count, color, obj = rng.choice(_COUNTS), rng.choice(_COLORS), rng.choice(_OBJECTS)
        rel, color2, obj2 = rng.choice(_RELATIONS), rng.choice(_COLORS), rng.choice(_OBJECTS)
        style, side, side2 = rng.choice(_STYLES), rng.choice(_SIDES), rng.choice(_SIDES)
        lines.append(f"A {style} of {count} {color} {obj}s {rel} a {color2} {obj2}.")
        lines.append(
            f"An {style} of {count} {color} {obj}s on the {side} and {color2} {obj2}s on the {side2}."
        )
        lines.append("".join(rng.choice(_ZH) for _ in range(rng.randint(3, 9))) + "。")
    lines.extend(" ".join(p) for p in itertools.product(_COLORS, _OBJECTS))
    return lines


def train_tokenizer(vocab_size: int = 2048, seed: int = 0) -> GemmaTokenizer:
    """Train a small byte-fallback BPE offline and wrap it as a ``GemmaTokenizer``.

    The normalisation matches Gemma's (spaces become ``▁``), special ids match Gemma's
    (pad 0, eos 1, bos 2, unk 3), and unseen characters fall back to byte tokens.
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
        show_progress=False,
        min_frequency=2,
    )
    bpe.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model_state["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_state["merges"]]
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tok.padding_side = "right"
    tok.model_max_length = MAX_TEXT_TOKENS
    return tok


def build_text_encoder(spec: TextEncoderSpec, vocab_size: int, seed: int = 0) -> Gemma2Model:
    """A randomly initialised ``Gemma2Model`` of the given size (deterministic for a seed)."""
    config = Gemma2Config(
        vocab_size=spec.vocab_size or vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        sliding_window=spec.sliding_window,
        query_pre_attn_scalar=spec.query_pre_attn_scalar or spec.head_dim,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma2Model(config)
    return model.eval()


@dataclass
class PromptEmbeddings:
    """Caption features for the transformer: ``(B, L, D)`` embeddings and a ``(B, L)`` mask."""

    embeds: torch.Tensor
    mask: torch.Tensor


@torch.no_grad()
def encode_prompts(
    prompts: Sequence[str],
    tokenizer: GemmaTokenizer,
    text_encoder: Gemma2Model,
    *,
    max_length: int = MAX_TEXT_TOKENS,
    pad_to_multiple_of: int | None = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PromptEmbeddings:
    """Encode prompts with Gemma2 and return the second-to-last hidden state.

    Padding is always on the right (the transformer expects the valid caption tokens first);
    sequences are padded to the longest prompt (rounded up to ``pad_to_multiple_of``) rather than
    to ``max_length``, which gives the same features for the valid tokens with less work.
    """
    device = torch.device(device) if device is not None else text_encoder.device
    tokenizer.padding_side = "right"
    batch = tokenizer(
        list(prompts),
        padding=True,
        pad_to_multiple_of=pad_to_multiple_of,
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    )
    input_ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    out = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
    embeds = out.hidden_states[-2]
    return PromptEmbeddings(embeds=embeds.to(dtype or embeds.dtype), mask=mask)
