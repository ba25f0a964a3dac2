"""UniCap perspectives (style, main object, objects, attributes, spatial, ocr) end to end: parsing,
the captioner's second prompt, native resolution up to the processor's budget, the metadata backend,
the gate, the recaption config and the training caption sampler's weights."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.errors import ConfigError
from components.ingest.gate import GateFailed
from components.recaption.backends import metadata_captions, scene_perspectives
from components.recaption.config import RecaptionConfig, parse_perspectives, recaption_config
from components.recaption.gate import run_caption_gate
from components.recaption.parse import missing_message, parse_captions
from components.recaption.schema import (
    CAPTION_KINDS,
    GRANULARITIES,
    LANGUAGES,
    NO_TEXT,
    PERSPECTIVES,
    caption_rows,
    is_training_caption,
)
from components.recaption.tiny_vlm import build_tiny_qwen2vl
from components.recaption.vlm import RELEASED_MAX_PIXELS, VlmCaptioner, processor_pixel_budget
from components.train.config import DEFAULT_GRANULARITY_WEIGHTS, TrainConfig
from components.train.data import Caption, TrainRecord, caption_texts, choose_caption
from model.prompts import SystemPrompt

TINY_BUDGET = 16 * 28 * 28  # the tiny model's saved processor budget


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def released_budget_vlm(tmp_path_factory):
    """The tiny model with the released Qwen2-VL processors' pixel budget (12845056)."""
    return build_tiny_qwen2vl(
        tmp_path_factory.mktemp("unicap") / "big", seed=0, max_pixels=RELEASED_MAX_PIXELS
    )


# ----------------------------------------------------------------------------------------------
# Parsing

VIEWS = {
    "style": "A watercolor painting with soft light.",
    "main_object": "A red cat.",
    "objects": "cat, mat, window",
    "attributes": "The cat is red and fluffy; the mat is blue.",
    "spatial": "The cat sits on the mat, below the window.",
    "ocr": "OPEN 24H",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            json.dumps({**VIEWS, "objects": ["cat", " mat ", "window", ""]}), VIEWS, id="json-with-list"
        ),
        pytest.param(
            "```json\n"
            + json.dumps(
                {
                    "Style": VIEWS["style"],
                    "Main subject": VIEWS["main_object"],
                    "all_objects": "cat，mat、window",
                    "object attributes": VIEWS["attributes"],
                    "spatial relationships": VIEWS["spatial"],
                    "visible text": ["OPEN 24H"],
                }
            )
            + "\n```",
            VIEWS,
            id="aliases-in-fence",
        ),
        pytest.param(
            "**Style:** A watercolor painting with soft light.\n- Main object: A red cat.\n"
            "Objects: cat, mat, window\nAttributes: The cat is red and fluffy; the mat is blue.\n"
            "Spatial relations: The cat sits on the mat, below the window.\nOCR: OPEN 24H",
            VIEWS,
            id="labelled-lines",
        ),
        pytest.param(
            '{"style": "A watercolor painting with soft light.", "ocr": "none", "spatial": "The cat si',
            {"style": VIEWS["style"], "ocr": NO_TEXT},
            id="truncated",
        ),
        pytest.param('{"ocr": null, "objects": []}', {"ocr": NO_TEXT}, id="ocr-null-is-no-text"),
        pytest.param('{"ocr": ""}', {"ocr": NO_TEXT}, id="ocr-empty-is-no-text"),
        pytest.param('{"ocr": "None."}', {"ocr": NO_TEXT}, id="ocr-none-dot"),
        pytest.param('{"ocr": "无"}', {"ocr": NO_TEXT}, id="ocr-zh-none"),
        pytest.param('{"ocr": ["无文字"]}', {"ocr": NO_TEXT}, id="ocr-zh-none-list"),
        pytest.param('{"ocr": ["STOP", "none", "Main St."]}', {"ocr": "STOP; Main St."}, id="ocr-list"),
        pytest.param('{"ocr": 3, "style": {"a": "b"}}', {}, id="non-text"),
        pytest.param(
            "OCR:\nStyle: A watercolor painting with soft light.",
            {"style": VIEWS["style"]},
            id="empty-label-is-no-answer",
        ),
        pytest.param(
            json.dumps({"detailed": "x", "short": "y", "tag": ["a"]}), {}, id="lengths-are-not-views"
        ),
        pytest.param("A red cat on a mat.", {}, id="prose-is-not-claimed"),
    ],
)
def test_parse_perspectives(text, expected):
    assert parse_captions(text, PERSPECTIVES) == expected


def test_lengths_and_perspectives_parse_independently():
    both = json.dumps({"detailed": "A red cat on a mat.", "short": "A cat.", **VIEWS})
    assert parse_captions(both) == {"detailed": "A red cat on a mat.", "short": "A cat."}  # default: lengths
    assert parse_captions(both, PERSPECTIVES) == VIEWS
    assert parse_captions(both, ("ocr",)) == {"ocr": "OPEN 24H"}
    # a "Text:" line is a perspective label, not part of a multi-line length value
    assert parse_captions("Detailed:\nA red cat\nText: hi") == {"detailed": "A red cat Text: hi"}
    with pytest.raises(ValueError, match="unknown caption kinds"):
        parse_captions("{}", ("colour",))


def test_missing_message_reports_perspectives_like_lengths():
    caps = {
        "en": {**dict.fromkeys(GRANULARITIES, "x"), "style": "s", "ocr": NO_TEXT},
        "zh": {"short": "一只猫"},
    }
    assert missing_message(caps, LANGUAGES, PERSPECTIVES) == (
        "en: missing main_object, objects, attributes, spatial; "
        "zh: no caption could be parsed from the model output"
    )
    assert missing_message(caps, ("en",)) is None  # the lengths are complete
    assert missing_message(caps, ("en",), ("style", "ocr")) is None


# ----------------------------------------------------------------------------------------------
# The captioner: a second prompt per image and language


def _answer_by_prompt(captioner: VlmCaptioner, lengths: str, views: str):
    """A ``generate`` answering ``views`` to perspective prompts and ``lengths`` to the others."""
    tok = captioner.processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id
    seen: list[str] = []

    def generate(input_ids, **kwargs):
        rows = []
        for row in input_ids:
            prompt = tok.decode(row, skip_special_tokens=False)
            kind = "perspectives" if "several perspectives" in prompt else "lengths"
            seen.append(kind)
            ids = tok(views if kind == "perspectives" else lengths, add_special_tokens=False).input_ids
            rows.append(torch.tensor([*ids, end]))
        width = max(len(r) for r in rows)
        tail = torch.stack([torch.cat([r, torch.full((width - len(r),), pad)]) for r in rows])
        return torch.cat([input_ids, tail], dim=1)

    return generate, seen


LENGTHS = json.dumps({"detailed": "A red cat on a blue mat.", "medium": "A red cat.", "short": "A cat.",
                      "tag": ["cat"]})  # fmt: skip


def test_captioner_asks_for_perspectives_in_a_second_prompt(tiny_vlm, monkeypatch):
    cap = VlmCaptioner(tiny_vlm, batch_size=3, max_new_tokens=4)
    assert cap.perspectives == PERSPECTIVES and cap.prompt_kinds == ("lengths", "perspectives")
    assert cap.prompts_per_image == 4
    views = "Sure:\n```json\n" + json.dumps({**VIEWS, "ocr": "none"}) + "\n```"
    generate, seen = _answer_by_prompt(cap, LENGTHS, views)
    monkeypatch.setattr(cap.model, "generate", generate)
    results = cap.caption([noise(64, 48), noise(40, 80, seed=1)])
    assert seen == ["lengths", "perspectives"] * 4  # image by image, languages inside, lengths first
    assert cap.batch_rows == [3, 3, 2]
    for r in results:
        assert r.error is None and r.perspective_error is None
        for lang in LANGUAGES:
            assert r.captions[lang] == {**json.loads(LENGTHS), "tag": "cat", **VIEWS, "ocr": NO_TEXT}
            assert r.raw_perspectives_by_language[lang] == views and r.raw_by_language[lang] == LENGTHS
    rows = caption_rows("img", results[0].captions, "vlm")
    assert [row["granularity"] for row in rows] == list(CAPTION_KINDS) * 2


def test_a_garbled_perspective_answer_keeps_the_lengths(tiny_vlm, monkeypatch):
    cap = VlmCaptioner(tiny_vlm, batch_size=4, max_new_tokens=4, languages=("en",))
    generate, _ = _answer_by_prompt(cap, LENGTHS, '{"style": "A photo.", "main_object": "A c')
    monkeypatch.setattr(cap.model, "generate", generate)
    [result] = cap.caption([noise(64, 64)])
    assert result.error is None  # the lengths are complete: the image counts as captioned
    assert result.perspective_error == "en: missing main_object, objects, attributes, spatial, ocr"
    assert result.captions["en"]["style"] == "A photo." and "main_object" not in result.captions["en"]


def test_perspectives_can_be_chosen_or_turned_off(tiny_vlm, monkeypatch):
    some = VlmCaptioner(tiny_vlm, max_new_tokens=4, perspectives=("ocr", "style"), languages=("en",))
    assert some.perspectives == ("style", "ocr")  # canonical order
    prompt = some.instruction("en", "perspectives")
    assert '"style"' in prompt and '"ocr"' in prompt and '"spatial"' not in prompt
    generate, _ = _answer_by_prompt(some, LENGTHS, json.dumps(VIEWS))
    monkeypatch.setattr(some.model, "generate", generate)
    [result] = some.caption([noise(64, 64)])
    assert set(result.captions["en"]) == {*GRANULARITIES, "style", "ocr"} and result.perspective_error is None

    off = VlmCaptioner(tiny_vlm, max_new_tokens=4, perspectives=())
    assert off.prompt_kinds == ("lengths",) and off.prompts_per_image == 2
    generate, seen = _answer_by_prompt(off, LENGTHS, json.dumps(VIEWS))
    monkeypatch.setattr(off.model, "generate", generate)
    [result] = off.caption([noise(64, 64)])
    assert seen == ["lengths", "lengths"] and result.perspective_error is None
    assert set(result.captions["en"]) == set(GRANULARITIES) and result.raw_perspectives_by_language == {}


# ----------------------------------------------------------------------------------------------
# Native resolution: the processor's own pixel budget


def _grid_going_in(cap: VlmCaptioner, image: Image.Image, monkeypatch) -> torch.Tensor:
    """The ``image_grid_thw`` the model receives for ``image`` (one real, 1-token generation)."""
    grids = []
    original = cap.model.generate

    def spy(*args, **kwargs):
        grids.append(kwargs["image_grid_thw"].clone())
        return original(*args, **kwargs)

    monkeypatch.setattr(cap.model, "generate", spy)
    cap.caption([image])
    assert grids and all(torch.equal(g, grids[0]) for g in grids)
    return grids[0][0]


def test_default_is_the_processors_pixel_budget(tiny_vlm, released_budget_vlm):
    tiny = VlmCaptioner(tiny_vlm, max_new_tokens=1)
    assert tiny.max_pixels == tiny.pixel_budget == TINY_BUDGET and tiny.min_pixels == 4 * 28 * 28
    big = VlmCaptioner(released_budget_vlm, max_new_tokens=1)
    assert big.max_pixels == big.pixel_budget == RELEASED_MAX_PIXELS == 12845056
    assert processor_pixel_budget(big.processor.image_processor) == (3136, 12845056)
    capped = VlmCaptioner(released_budget_vlm, max_new_tokens=1, max_pixels=64 * 28 * 28)
    assert capped.max_pixels == 64 * 28 * 28 and capped.pixel_budget == RELEASED_MAX_PIXELS

    class OldStyle:  # older transformers: the budget as attributes
        min_pixels, max_pixels, size = 3136, 1003520, {"shortest_edge": 1, "longest_edge": 2}

    assert processor_pixel_budget(OldStyle()) == (3136, 1003520)
    assert processor_pixel_budget(object()) == (3136, RELEASED_MAX_PIXELS)


def test_a_non_square_image_goes_in_at_native_resolution(released_budget_vlm, monkeypatch):
    cap = VlmCaptioner(released_budget_vlm, max_new_tokens=1, languages=("en",), perspectives=())
    t, h, w = (int(v) for v in _grid_going_in(cap, noise(700, 280), monkeypatch))
    # 700x280 (2.5:1) is far below the budget: it goes in unresized (sides already multiples of 28)
    assert (t, h * 14, w * 14) == (1, 280, 700)
    # 1000x430: below the budget, so only rounded to multiples of 28; the aspect ratio is kept
    t, h, w = (int(v) for v in _grid_going_in(cap, noise(1000, 430, seed=2), monkeypatch))
    assert (h * 14, w * 14) == (420, 1008)
    assert abs((w / h) / (1000 / 430) - 1) < 0.05 and h * w * 196 <= RELEASED_MAX_PIXELS


def test_a_capped_non_square_image_keeps_its_aspect_ratio_within_the_budget(tiny_vlm, monkeypatch):
    cap = VlmCaptioner(tiny_vlm, max_new_tokens=1, languages=("en",), perspectives=())  # budget 12544
    for width, height in ((900, 300), (240, 720)):
        _, h, w = (int(v) for v in _grid_going_in(cap, noise(width, height), monkeypatch))
        pixels = h * w * 14 * 14
        assert pixels <= TINY_BUDGET and pixels > TINY_BUDGET // 2
        assert (w > h) == (width > height)
        assert abs(np.log((w / h) / (width / height))) < np.log(1.5)  # 28 px rounding of a 16-token image


# ----------------------------------------------------------------------------------------------
# The metadata backend, the gate and the config


def _scene(objects, source="synthetic"):
    return {"file": "x.png", "source": source, "objects": objects, "captions": []}


RED_CIRCLES = [
    {"shape": "circle", "color": "red", "region": "left", "bbox": [4, y, 24, y + 20]} for y in (2, 23)
]
BLUE_STAR = [{"shape": "star", "color": "blue", "region": "right", "bbox": [36, 2, 56, 22]}]


def test_metadata_perspectives_come_from_the_scene():
    views = scene_perspectives(_scene(RED_CIRCLES + BLUE_STAR))
    en, zh = views["en"], views["zh"]
    assert set(en) == set(zh) == set(PERSPECTIVES)
    assert "flat synthetic rendering" in en["style"] and "合成渲染" in zh["style"]
    assert en["main_object"] == "two red circles" and zh["main_object"] == "两个红色的圆形"
    assert (
        en["objects"] == "two red circles, one blue star"
        and zh["objects"] == "两个红色的圆形、一个蓝色的星星"
    )
    assert "the circles on the left are red" in en["attributes"] and "the same size" in en["attributes"]
    assert "the star on the right is blue" in en["attributes"] and "蓝色" in zh["attributes"]
    assert "stacked in a vertical column" in en["spatial"]
    assert "the red circles are to the left of the blue star" in en["spatial"]
    assert "红色的圆形在蓝色的星星的左边" in zh["spatial"]
    assert en["ocr"] == zh["ocr"] == NO_TEXT
    tied = scene_perspectives(_scene(RED_CIRCLES[:1] + BLUE_STAR))["en"]
    assert tied["main_object"] == "one red circle and one blue star"  # a tie names both, picks none


def test_metadata_perspectives_invent_nothing_outside_the_generator():
    assert scene_perspectives(_scene(RED_CIRCLES, source="photos")) == {}
    assert (
        scene_perspectives(_scene([{"shape": "dog", "color": "red", "region": "left", "bbox": [0, 0, 1, 1]}]))
        == {}
    )
    assert scene_perspectives(_scene([{"shape": "circle"}])) == {}
    assert scene_perspectives(_scene([])) == {}
    recorded = _scene(BLUE_STAR)
    recorded["captions"] = [{"granularity": "style", "language": "en", "text": "recorded style"}]
    assert metadata_captions(recorded)["en"]["style"] == "recorded style"  # ground truth wins


def test_gate_accepts_perspectives_and_rejects_unknown_kinds(tmp_path):
    caps = scene_perspectives(_scene(RED_CIRCLES))
    caps["en"].update(detailed="A long detailed caption of things.", medium="A medium caption.",
                      short="Short.", tag="a, b")  # fmt: skip
    caps["zh"].update(detailed="一段很长很详细的描述文字。", medium="中等长度的描述。", short="短。",
                      tag="甲，乙")  # fmt: skip
    caps["zh"]["ocr"] = "OPEN"  # visible text stays verbatim: no language check for ocr
    table = pd.DataFrame(caption_rows("img", caps, "metadata"))
    assert len(table) == 2 * len(CAPTION_KINDS)
    run_caption_gate(table, tmp_path / "ok")
    odd = table.copy()
    odd.loc[0, "granularity"] = "colour"
    with pytest.raises(GateFailed, match="granularity"):
        run_caption_gate(odd, tmp_path / "bad")


def test_recaption_config_chooses_perspectives_and_pixel_cap(tmp_path):
    default = RecaptionConfig()
    assert default.perspectives == list(PERSPECTIVES) and default.max_pixels is None
    assert "max_pixels" not in default.captioner_kwargs()  # native resolution: the processor's budget
    path = tmp_path / "recaption.yaml"
    path.write_text("perspectives: [ocr, style]\nmax_pixels: 1003520\nbatch_size: 8\n")
    cfg = recaption_config(path, batch_size=None, backend="vlm")
    assert cfg.perspectives == ["style", "ocr"] and cfg.backend == "vlm" and cfg.batch_size == 8
    assert cfg.captioner_kwargs()["max_pixels"] == 1003520
    assert recaption_config(path, perspectives=[]).captioner_kwargs()["perspectives"] == ()
    assert parse_perspectives("all") == list(PERSPECTIVES) and parse_perspectives("none") == []
    assert parse_perspectives("style, ocr") == ["style", "ocr"]
    for bad in ({"perspectives": ["colour"]}, {"backend": "gpt"}, {"max_pixels": 10}, {"colour": 1}):
        with pytest.raises(ConfigError, match=r"^recaption config: invalid"):
            recaption_config(**bad)


def test_cli_passes_perspectives_and_pixel_cap_to_the_captioner(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import components.recaption.recaption as rc
    from components.recaption.__main__ import app

    seen = {}

    def fake_vlm_function(model, **kwargs):
        seen.update(kwargs, model=model)
        raise SystemExit(0)

    monkeypatch.setattr(rc, "vlm_function", fake_vlm_function)
    args = [str(tmp_path), str(tmp_path / "out"), "--vlm-model", "m", "--perspectives", "objects,spatial",
            "--max-pixels", "200704"]  # fmt: skip
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen["perspectives"] == ("objects", "spatial") and seen["max_pixels"] == 200704
    seen.clear()
    assert CliRunner().invoke(app, args[:4]).exit_code == 0
    assert seen["perspectives"] == PERSPECTIVES and "max_pixels" not in seen


# ----------------------------------------------------------------------------------------------
# Training: caption sampling by configured weights


def _record(ocr: str) -> TrainRecord:
    caps = [Caption(g, lang, f"{lang}:{g}") for lang in LANGUAGES for g in CAPTION_KINDS if g != "ocr"]
    caps += [Caption("ocr", lang, ocr) for lang in LANGUAGES]
    return TrainRecord("r", None, "synthetic", tuple(caps))


PLAIN = {"synthetic": SystemPrompt.NONE}


def test_default_weights_cover_lengths_and_perspectives(tmp_path):
    assert set(DEFAULT_GRANULARITY_WEIGHTS) == set(CAPTION_KINDS)
    assert DEFAULT_GRANULARITY_WEIGHTS["detailed"] == 1.0 and DEFAULT_GRANULARITY_WEIGHTS["ocr"] == 0.25
    cfg = TrainConfig(manifest=tmp_path / "m.parquet", output_dir=tmp_path)
    assert cfg.granularity_weights == DEFAULT_GRANULARITY_WEIGHTS
    custom = TrainConfig(
        manifest=tmp_path / "m", output_dir=tmp_path, granularity_weights={"style": 0, "x": 2}
    )
    assert custom.granularity_weights == {**DEFAULT_GRANULARITY_WEIGHTS, "style": 0.0, "x": 2.0}
    with pytest.raises(ValueError, match="caption weights must be >= 0"):
        TrainConfig(manifest=tmp_path / "m", output_dir=tmp_path, granularity_weights={"ocr": -1})


@pytest.mark.parametrize("ocr", ["none", "None", "STOP"])
def test_chosen_captions_follow_the_weights(tmp_path, ocr):
    cfg = TrainConfig(manifest=tmp_path / "m.parquet", output_dir=tmp_path)
    record = _record(ocr)
    rng = random.Random(1234)
    draws = 40_000
    counts = Counter(
        choose_caption(record, rng, cfg.granularity_weights, cfg.language_weights, PLAIN)
        for _ in range(draws)
    )
    has_text = is_training_caption("ocr", ocr)
    expected = {
        (f"{lang}:{g}" if g != "ocr" else ocr, lang): cfg.granularity_weights[g] * cfg.language_weights[lang]
        for lang in LANGUAGES
        for g in CAPTION_KINDS
        if g != "ocr" or has_text
    }
    if not has_text:
        assert all(ocr not in text for text in counts)  # "none" is never a training caption
        assert ocr not in caption_texts(record, PLAIN)
    total = sum(expected.values())
    by_text: Counter[str] = Counter()
    for (text, _), w in expected.items():
        by_text[text] += w / total  # an ocr text shared by both languages gathers both weights
    assert set(counts) == set(by_text)
    for text, p in by_text.items():
        sigma = (p * (1 - p) / draws) ** 0.5
        assert abs(counts[text] / draws - p) < 5 * sigma + 1e-3, (text, counts[text] / draws, p)


def test_zero_weights_turn_kinds_off_and_none_only_records_train_unconditionally():
    record = _record("none")
    only_views = {g: (1.0 if g in PERSPECTIVES else 0.0) for g in CAPTION_KINDS}
    rng = random.Random(0)
    drawn = {choose_caption(record, rng, only_views, {"en": 1.0, "zh": 0.0}, PLAIN) for _ in range(500)}
    assert drawn == {f"en:{g}" for g in PERSPECTIVES if g != "ocr"}
    bare = TrainRecord("b", None, "synthetic", (Caption("ocr", "en", "none"), Caption("ocr", "zh", " NONE ")))
    assert choose_caption(bare, rng, DEFAULT_GRANULARITY_WEIGHTS, {}, PLAIN) == ""
    assert caption_texts(bare, PLAIN) == []


def test_the_recaption_task_checks_its_captioner_settings(tmp_path):
    """``vlm_config_json`` (the pipeline parameter) is validated before anything is captioned."""
    from pydantic import ValidationError

    from components.recaption.component import recaption_group_op

    artifact = type("Artifact", (), {"path": str(tmp_path / "captions"), "metadata": {}})()
    with pytest.raises(ValidationError, match="unknown perspectives"):
        recaption_group_op.python_func(
            group="{}", dataset_hash="x", captions=artifact, vlm_config_json='{"perspectives": ["smell"]}'
        )
