"""The ``vlm`` recaption backend on a tiny random Qwen2-VL built offline (no hub access)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from components.recaption.parse import parse_captions
from components.recaption.tiny_vlm import build_tiny_qwen2vl
from components.recaption.vlm import (
    CAPTION_KINDS,
    GRANULARITIES,
    LANGUAGES,
    PERSPECTIVE_PROMPTS,
    PERSPECTIVES,
    PROMPT_VERSION,
    PROMPTS,
    CaptionerError,
    ImageCaptions,
    VlmCaptioner,
)

MAX_PIXELS = 16 * 28 * 28  # at most 16 merged visual tokens per image
MIN_PIXELS = 4 * 28 * 28
NEW_TOKENS = 12


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is as fast and does not stall on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def captioner(tiny_vlm) -> VlmCaptioner:
    return VlmCaptioner(
        tiny_vlm, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, batch_size=3, max_new_tokens=NEW_TOKENS
    )


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Different sizes and modes, one far beyond max_pixels."""
    return [
        noise(64, 48, seed=1),
        noise(100, 200, "RGBA", seed=2),
        noise(1600, 1200, "L", seed=3),  # 1.9 Mpx, resized down to <= MAX_PIXELS
        noise(300, 90, "P", seed=4),
        noise(40, 40, seed=5),  # below min_pixels, resized up
    ]


# ----------------------------------------------------------------------------------------------
# Building and loading


def test_tiny_checkpoint_has_the_hub_layout_and_consistent_special_tokens(tiny_vlm, captioner):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (tiny_vlm / name).is_file(), name
    config = json.loads((tiny_vlm / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert config["architectures"] == ["Qwen2VLForConditionalGeneration"]
    tok = captioner.processor.tokenizer
    assert config["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config["vision_end_token_id"] == tok.convert_tokens_to_ids("<|vision_end|>")
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert tok.tokenize(special) == [special]  # one atomic token, never split by BPE
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert "Qwen2VL" in type(captioner.model).__name__
    assert sum(p.numel() for p in captioner.model.parameters()) < 2_000_000


def test_build_is_deterministic_for_a_seed(tmp_path, captioner):
    from safetensors.torch import load_file

    a = load_file(build_tiny_qwen2vl(tmp_path / "a", seed=0) / "model.safetensors")
    b = load_file(build_tiny_qwen2vl(tmp_path / "b", seed=1) / "model.safetensors")
    ours = captioner.model.state_dict()
    key = next(k for k in a if k.endswith("embed_tokens.weight"))
    assert torch.equal(a[key], next(v for k, v in ours.items() if k.endswith("embed_tokens.weight")))
    assert not torch.equal(a[key], b[key])


def test_missing_path_raises_a_one_line_captioner_error(tmp_path):
    with pytest.raises(CaptionerError, match="cannot load VLM captioner") as info:
        VlmCaptioner(tmp_path / "no-such-model")
    assert "\n" not in str(info.value) and "no-such-model" in str(info.value)


def test_unreachable_hub_id_and_non_model_folder_raise_captioner_error(tmp_path):
    with pytest.raises(CaptionerError, match=r"^cannot load VLM captioner 'lumina-test/no-such-vlm': "):
        VlmCaptioner("lumina-test/no-such-vlm")  # HF_HUB_OFFLINE=1 (conftest) and not cached
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionerError) as info:
        VlmCaptioner(tmp_path / "empty")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"max_new_tokens": 0},
        {"languages": ("fr",)},
        {"max_pixels": 100},
        {"min_pixels": 100},
        {"min_pixels": 5000, "max_pixels": 4000},
        {"perspectives": ("colour",)},
        {"perspectives": ("style", "style")},
    ],
)
def test_bad_arguments_raise_before_loading(tmp_path, kwargs):
    with pytest.raises(CaptionerError):
        VlmCaptioner(tmp_path / "never-loaded", **kwargs)


def test_captioner_records_model_id_and_prompt_version(tiny_vlm, captioner):
    assert captioner.model_id == str(tiny_vlm)
    assert captioner.PROMPT_VERSION == captioner.prompt_version == PROMPT_VERSION == "unicap-v2"
    assert "unicap-v2" in repr(captioner) and "perspectives=" in repr(captioner)


# ----------------------------------------------------------------------------------------------
# Prompts and preprocessing


@pytest.mark.parametrize("language", LANGUAGES)
def test_prompt_uses_the_chat_template_and_one_image_placeholder(captioner, language):
    prompt = captioner.build_prompt(language)
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + PROMPTS[language] in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count("<|image_pad|>") == 1
    for g in GRANULARITIES:
        assert f'"{g}"' in PROMPTS[language]
    assert ("Simplified Chinese" in PROMPTS[language]) == (language == "zh")
    views = captioner.build_prompt(language, "perspectives")
    assert views.count("<|image_pad|>") == 1 and PERSPECTIVE_PROMPTS[language] in views
    for p in PERSPECTIVES:
        assert f'"{p}"' in PERSPECTIVE_PROMPTS[language] and f'"{p}"' not in PROMPTS[language]
    assert ("Simplified Chinese" in PERSPECTIVE_PROMPTS[language]) == (language == "zh")


def test_preprocessing_caps_pixels_keeps_aspect_and_expands_image_tokens(captioner, images):
    rgb = [captioner._to_rgb(im) for im in images]
    inputs = captioner.preprocess(rgb, [captioner.build_prompt("en")] * len(rgb))
    grid = inputs["image_grid_thw"]
    assert grid.shape == (len(images), 3)
    patch = 14
    pixels = grid[:, 1] * grid[:, 2] * patch * patch
    assert (pixels <= MAX_PIXELS).all() and (pixels >= MIN_PIXELS).all()
    assert (grid[:, 1] % 2 == 0).all() and (grid[:, 2] % 2 == 0).all()  # whole 2x2 merges
    large = grid[2]  # 1600x1200 landscape: still landscape, and as close to the cap as 28 px allows
    assert large[2] > large[1] and int(large[1] * large[2]) * patch * patch > MAX_PIXELS // 2
    assert grid[1][1] > grid[1][2]  # the 100x200 portrait stays portrait
    # every image contributes t*h*w/4 <|image_pad|> tokens to its own prompt (left padding)
    pad_id = captioner.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_row = (inputs["input_ids"] == pad_id).sum(dim=1)
    assert per_row.tolist() == (grid.prod(dim=1) // 4).tolist()
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padded: real tokens at the end
    assert inputs["attention_mask"][:, 0].sum() < len(images)


def test_max_pixels_setting_changes_the_grid(tiny_vlm, captioner):
    big = VlmCaptioner(tiny_vlm, max_pixels=4 * MAX_PIXELS, min_pixels=MIN_PIXELS, max_new_tokens=2)
    image = [noise(1600, 1200)]
    prompt = [captioner.build_prompt("en")]
    small_grid = captioner.preprocess(image, prompt)["image_grid_thw"][0]
    big_grid = big.preprocess(image, prompt)["image_grid_thw"][0]
    assert int(big_grid.prod()) > 2 * int(small_grid.prod())
    assert int(big_grid[1] * big_grid[2]) * 196 <= 4 * MAX_PIXELS


def test_images_are_converted_to_rgb_with_transparency_on_white():
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert VlmCaptioner._to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    assert VlmCaptioner._to_rgb(Image.new("L", (8, 8), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert VlmCaptioner._to_rgb(Image.new("P", (8, 8))).mode == "RGB"
    assert VlmCaptioner._to_rgb(Image.new("CMYK", (8, 8))).mode == "RGB"


# ----------------------------------------------------------------------------------------------
# Captioning with the random model


def test_caption_batch_one_result_per_image_in_order(captioner, images):
    results = captioner.caption(images)
    assert len(results) == len(images) and all(isinstance(r, ImageCaptions) for r in results)
    raws = [r.raw for r in results]
    assert len(set(raws)) > 1  # outputs depend on the image, so the order check below means something
    for r in results:
        assert set(r.raw_by_language) == set(r.raw_perspectives_by_language) == set(LANGUAGES)
        assert r.raw == "\n".join(f"[{lang}]\n{r.raw_by_language[lang]}" for lang in LANGUAGES)
        assert "<|im_start|>" not in r.raw and "assistant\n" not in r.raw  # only the new tokens
        # honesty: a random model may yield nothing parsable; then it must say so, never invent
        for lang, caps in r.captions.items():
            assert set(caps) <= set(CAPTION_KINDS) and all(caps.values())
            for g, text in caps.items():
                if g not in ("tag", "objects", "ocr"):  # lists are re-joined, "no text" is canonical
                    raw = (
                        r.raw_by_language[lang]
                        if g in GRANULARITIES
                        else r.raw_perspectives_by_language[lang]
                    )
                    assert text in raw or json.dumps(text)[1:-1] in raw
        complete = all(set(GRANULARITIES) <= set(r.captions.get(lang, {})) for lang in LANGUAGES)
        assert (r.error is None) == complete
        views = all(set(PERSPECTIVES) <= set(r.captions.get(lang, {})) for lang in LANGUAGES)
        assert (r.perspective_error is None) == views
        if not r.captions:
            assert (
                "no caption could be parsed" in r.error
                and "no caption could be parsed" in r.perspective_error
            )
    reordered = captioner.caption([images[3], images[0]])
    assert [r.raw for r in reordered] == [raws[3], raws[0]]


def test_batching_splits_prompts_into_batch_size_chunks_with_identical_results(tiny_vlm, images, monkeypatch):
    calls: list[int] = []
    by_batch = {}
    for batch_size in (1, 3):
        cap = VlmCaptioner(
            tiny_vlm, max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS, batch_size=batch_size, max_new_tokens=6
        )
        original = cap.model.generate

        def counting(*args, _original=original, **kwargs):
            calls.append(int(kwargs["input_ids"].shape[0]))
            assert kwargs["do_sample"] is False
            return _original(*args, **kwargs)

        monkeypatch.setattr(cap.model, "generate", counting)
        by_batch[batch_size] = [(r.raw, r.captions, r.error) for r in cap.caption(images)]
        assert cap.generate_calls == len(cap.batch_rows)
    # 20: one lengths prompt and one perspective prompt per image per language
    prompts = len(images) * len(LANGUAGES) * 2
    assert calls == [1] * prompts + [3] * 6 + [2]
    assert by_batch[1] == by_batch[3]  # greedy decoding, left padding: batching changes nothing


def test_bad_images_are_reported_and_the_rest_captioned(captioner):
    thin = noise(1, 300)  # aspect ratio 300 > 200: Qwen2-VL cannot take it
    results = captioner.caption([noise(64, 64), thin, noise(48, 80)])
    assert len(results) == 3
    assert results[1].captions == {} and results[1].raw == ""
    assert results[1].error.startswith("image not captioned: ValueError: aspect ratio")
    assert results[0].raw and results[2].raw
    assert captioner.caption([]) == []


def _scripted_generate(captioner, answer: str):
    """Replace ``generate`` by a model that always answers ``answer`` (to test decoding + parsing)."""
    tok = captioner.processor.tokenizer
    answer_ids = tok(answer, add_special_tokens=False, return_tensors="pt").input_ids[0]
    end = torch.tensor([tok.convert_tokens_to_ids("<|im_end|>")])

    def generate(input_ids, **kwargs):
        tail = torch.cat([answer_ids, end]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)

    return generate


def test_well_formed_model_output_fills_every_granularity(tiny_vlm, monkeypatch):
    cap = VlmCaptioner(tiny_vlm, max_pixels=MAX_PIXELS, batch_size=2, languages=("en",))
    answer = (
        'Here you go:\n```json\n{"detailed": "A red cat sits on a blue mat.", "medium": "A red cat.", '
        '"short": "A cat.", "tag": ["cat", "red", "mat"]}\n```'
    )
    monkeypatch.setattr(cap.model, "generate", _scripted_generate(cap, answer))
    [result] = cap.caption([noise(64, 64)])
    assert result.error is None
    assert result.captions == {
        "en": {"detailed": "A red cat sits on a blue mat.", "medium": "A red cat.", "short": "A cat.",
               "tag": "cat, red, mat"}
    }  # fmt: skip
    assert result.raw == answer  # verbatim (special tokens dropped), prompt not included


def test_truncated_model_output_keeps_only_what_is_there(tiny_vlm, monkeypatch):
    cap = VlmCaptioner(tiny_vlm, max_pixels=MAX_PIXELS, batch_size=4)
    answer = '{"detailed": "一只红色的猫坐在蓝色的垫子上。", "medium": "一只红'
    monkeypatch.setattr(cap.model, "generate", _scripted_generate(cap, answer))
    results = cap.caption([noise(64, 64), noise(32, 64)])
    for r in results:
        assert r.captions == {lang: {"detailed": "一只红色的猫坐在蓝色的垫子上。"} for lang in LANGUAGES}
        assert r.error == "en: missing medium, short, tag; zh: missing medium, short, tag"


# ----------------------------------------------------------------------------------------------
# parse_captions

FULL = {"detailed": "A red cat on a mat.", "medium": "A red cat.", "short": "A cat.", "tag": "cat, red"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            '{"detailed": " A red cat on a mat. ", "medium": "A red cat.", "short": "A cat.", '
            '"tag": ["cat", " red ", ""]}',
            FULL,
            id="json",
        ),
        pytest.param(
            'Sure! Here are the captions:\n```json\n{"detailed": "A red cat on a mat.",'
            '\n "medium": "A red cat.", "short": "A cat.", "tag": ["cat", "red"]}\n```\nAnything else?',
            FULL,
            id="fenced-json-with-chatter",
        ),
        pytest.param('```\n{"short": "A cat."}\n```', {"short": "A cat."}, id="bare-fence"),
        pytest.param(
            'I think {this is not json} but {"short": "A cat.", "tag": "cat,red ,, mat"} is.',
            {"short": "A cat.", "tag": "cat, red, mat"},
            id="json-after-braces-in-prose",
        ),
        pytest.param(
            '{"foo": 1} {"short": "A cat."}', {"short": "A cat."}, id="first-object-with-known-keys"
        ),
        pytest.param(
            "Detailed: A red cat on a mat.\nMedium: A red cat.\nShort: A cat.\nTag: cat, red",
            FULL,
            id="labelled-lines",
        ),
        pytest.param(
            "**Detailed caption:** A red cat on a mat.\n- **Medium**: A red cat.\n"
            '* short: "A cat."\n- Tags: [cat, red]',
            FULL,
            id="markdown-labels",
        ),
        pytest.param(
            "Detailed:\nA red cat\non a mat.\n\nShort: A cat.\nThanks!",
            {"detailed": "A red cat on a mat.", "short": "A cat."},
            id="multi-line-labelled-value",
        ),
        pytest.param(
            '{"detailed": "A red cat on a mat.", "medium": "A red ca',
            {"detailed": "A red cat on a mat."},
            id="truncated-json",
        ),
        pytest.param(
            '```json\n{"tag": ["cat", "red"], "short": "A cat.", "detailed": "A red cat on',
            {"tag": "cat, red", "short": "A cat."},
            id="truncated-fenced-json",
        ),
        pytest.param(
            '{"short": "A \\"quoted\\" cat.", "tag": ["cat"],}',
            {"short": 'A "quoted" cat.', "tag": "cat"},
            id="trailing-comma-and-escapes",
        ),
        pytest.param("{'short': 'A cat.',", {}, id="python-dict-truncated"),
        pytest.param(
            '{"caption": "x", "long": "y", "Short": "A cat.", "TAGS": "cat", "short_caption": "dup"}',
            {"short": "A cat.", "tag": "cat"},
            id="unknown-keys-and-aliases",
        ),
        pytest.param('{"short": 3, "detailed": null, "medium": {"x": "y"}, "tag": []}', {}, id="non-text"),
        pytest.param('{"detailed": "", "short": "   ", "tag": ["", " "]}', {}, id="empty-values"),
        pytest.param(
            '{"short": "一只猫。", "tag": ["猫", "红色"]}',
            {"short": "一只猫。", "tag": "猫, 红色"},
            id="chinese",
        ),
        pytest.param(
            "标签：猫、红色，垫子\n简短: x\nShort：一只猫。", {"short": "一只猫。"}, id="fullwidth-colon"
        ),
        pytest.param("", {}, id="empty"),
        pytest.param("   \n ", {}, id="blank"),
        pytest.param(None, {}, id="none"),
        pytest.param("key\x1abrown zebras bears persons sandwich red", {}, id="gibberish"),
        pytest.param("A red cat sitting on a mat, photographed from above.", {}, id="prose-is-not-claimed"),
    ],
)
def test_parse_captions(text, expected):
    assert parse_captions(text) == expected


def test_parse_captions_returns_only_known_granularities_and_strips():
    parsed = parse_captions(json.dumps({g: f"  {g} text \n" for g in [*GRANULARITIES, "extra", "long"]}))
    assert parsed == {g: f"{g} text" for g in GRANULARITIES}


# ----------------------------------------------------------------------------------------------
# The benchmark keeps running (numbers reported, not asserted)


@pytest.mark.slow
def test_recaption_bench_runs_and_reports_every_batch_size(tmp_path):
    out = tmp_path / "recaption.json"
    cmd = [sys.executable, "-m", "bench.recaption", "--configs", "tiny", "--batch-sizes", "1,2",
           "--images", "2", "--max-new-tokens", "4", "--repeats", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["prompt_version"] == PROMPT_VERSION and result["max_new_tokens"] == 4
    rows = result["configs"]["tiny"]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    assert [r["generate_calls"] for r in rows] == [8, 4]  # 2 images x 2 languages x (lengths, perspectives)
    assert all(r["captions_per_s"] > 0 and r["same_output_as_first_batch_size"] for r in rows)


def test_recaption_bench_rejects_an_unknown_config(tmp_path):
    cmd = [sys.executable, "-m", "bench.recaption", "--configs", "huge", "--out", str(tmp_path / "x.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: unknown config 'huge'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.json").exists()
