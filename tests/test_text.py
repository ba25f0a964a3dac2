import pytest
import torch

from common.errors import ConfigError
from model.prompts import SystemPrompt, apply_system_prompt, parse_system_prompt
from model.text import MAX_TEXT_TOKENS, encode_prompts, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(2048)


def test_tokenizer_is_deterministic_and_gemma_like(tokenizer):
    again = train_tokenizer(2048)
    assert tokenizer.get_vocab() == again.get_vocab()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    ids = tokenizer("two red cats").input_ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) < 6  # whole words were learned
    assert tokenizer.decode(ids, skip_special_tokens=True) == "two red cats"


def test_system_prompts_are_whole_words(tokenizer):
    """Every training caption starts with a system prompt: its words must be single tokens, or the
    template, not the caption, makes up most of the tiny model's sequence (it did: 43 of 72 tokens)."""
    caption = "An illustration of two red stars on the left and one purple circle on the right."
    for template in (SystemPrompt.A, SystemPrompt.B):
        text = apply_system_prompt(caption, template)
        prefix = text[: text.index("<Prompt Start>")]
        assert len(tokenizer(prefix, add_special_tokens=False).input_ids) <= len(prefix.split()) + 1
        assert len(tokenizer(text).input_ids) <= len(text.split()) + 4
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_tokenizer_round_trips_unseen_text_via_byte_fallback(tokenizer):
    text = "两只红色的猫 🐈 Zebra-Quokka"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_encode_prompts_uses_second_to_last_hidden_state_and_right_padding(tiny_pipe):
    tok, enc = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    tok.padding_side = "left"  # a released tokenizer config may say left; we must pad right anyway
    batch = encode_prompts(["a cat", "three blue dogs next to a red car"], tok, enc)
    assert batch.mask[0, 0] == 1 and batch.mask[0, -1] == 0
    assert batch.embeds.shape[:2] == batch.mask.shape and batch.embeds.shape[1] % 8 == 0
    ids = tok(["a cat"], return_tensors="pt").input_ids
    direct = enc(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    n = ids.shape[1]
    torch.testing.assert_close(batch.embeds[0, :n], direct[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(direct[0], enc(input_ids=ids).last_hidden_state[0])


def test_encode_prompts_truncates_to_256_tokens(tiny_pipe):
    long = " ".join(["cat"] * 400)
    out = encode_prompts([long], tiny_pipe.tokenizer, tiny_pipe.text_encoder)
    assert out.mask.shape[1] == MAX_TEXT_TOKENS and int(out.mask.sum()) == MAX_TEXT_TOKENS


def test_system_prompt_templates():
    a = apply_system_prompt("a cat", "A")
    b = apply_system_prompt("a cat", SystemPrompt.B)
    assert a.startswith("You are an assistant designed to generate high-quality images")
    assert a.endswith("<Prompt Start> a cat") and b.endswith("<Prompt Start> a cat")
    assert "superior degree of image-text alignment" in b
    c = apply_system_prompt("a cat", "c")
    assert "lower half" in c and "depth map" in c and "upper half" in c
    assert apply_system_prompt("a cat", "none") == "a cat"
    with pytest.raises(ConfigError, match="unknown system prompt template 'Z'"):
        parse_system_prompt("Z")


def test_template_defaults_follow_the_official_code():
    """The official sample.py / demo.py / diffusers default to the "real" system type (our B); its
    finetune.py trains plain captions with "base" (our A); AdamW eps 1e-15 and EMA decay 0.95."""
    from components.tier.tiering import TierConfig
    from components.train.config import TrainConfig, stage_config
    from model.prompts import DOMAIN_TEMPLATES, domain_template
    from model.sampler import SamplerConfig

    assert SamplerConfig().system_prompt is SystemPrompt.B
    assert apply_system_prompt("a cat") == apply_system_prompt("a cat", "B")
    cfg = stage_config("lowres", manifest="m.parquet", output_dir="out")
    assert cfg.system_prompts == {"real": SystemPrompt.B, "synthetic": SystemPrompt.A} == DOMAIN_TEMPLATES
    assert domain_template("unknown") is SystemPrompt.B and TierConfig().system_prompts == DOMAIN_TEMPLATES
    assert TrainConfig.model_fields["eps"].default == 1e-15 and cfg.ema_decay == 0.95
