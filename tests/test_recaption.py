"""Recaption: metadata and alt-text backends, resume, failures, and the caption gate."""

import pandas as pd
import pytest
from PIL import Image

from components.ingest.gate import GateFailed
from components.ingest.ingest import ingest
from components.recaption.backends import alt_text_captions, guess_language
from components.recaption.gate import run_caption_gate
from components.recaption.recaption import run_recaption
from components.recaption.schema import CAPTION_KINDS, LANGUAGES, NO_TEXT, PERSPECTIVES
from data_tools.synthetic import build_synthetic

TUX_STYLE = "A happy dog.\naf.utf8='n Gelukkige hond.\nzh_CN.UTF-8=一只快乐的狗。\nzh_TW.UTF-8=一隻快樂的狗。"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("rc")
    build_synthetic(root / "raw" / "synthetic", n=12, size=64)
    real = root / "raw" / "real"
    real.mkdir()
    Image.new("RGB", (80, 64), (10, 120, 200)).save(real / "dog.png")
    (real / "dog.txt").write_text(TUX_STYLE, encoding="utf-8")
    Image.new("RGB", (64, 80), (200, 120, 10)).save(real / "nocaption.png")
    ingest(root / "raw", root / "ingest")
    return root


def test_alt_text_keeps_human_lines_and_invents_nothing():
    caps = alt_text_captions(TUX_STYLE)
    assert caps == {"en": {"short": "A happy dog."}, "zh": {"short": "一只快乐的狗。"}}
    assert alt_text_captions("") == {} and alt_text_captions(None) == {}
    assert alt_text_captions("一只猫") == {"zh": {"short": "一只猫"}}
    assert guess_language("a cat") == "en" and guess_language("一只猫") == "zh"


def test_auto_backend_metadata_alt_text_and_failures(ingested):
    result = run_recaption(ingested / "ingest", ingested / "cap", progress=False)
    table = pd.read_parquet(result.captions)
    manifest = pd.read_parquet(result.manifest)
    synthetic = manifest[manifest["domain"] == "synthetic"]
    assert len(synthetic) >= 10  # the sample scenes survive dedup
    for image_id in synthetic["id"]:
        rows = table[table["image_id"] == image_id]
        # the four lengths and the six UniCap perspectives, derived from the scene ground truth
        assert {(r.language, r.granularity) for r in rows.itertuples()} == {
            (lang, g) for lang in LANGUAGES for g in CAPTION_KINDS
        }
        assert set(rows["backend"]) == {"metadata"}
        assert set(rows[rows["granularity"] == "ocr"]["text"]) == {NO_TEXT}
        assert set(rows[rows["granularity"].isin(PERSPECTIVES)]["text"].str.len().gt(0)) == {True}
    real = manifest[manifest["domain"] == "real"]
    assert len(real) == 1 and set(table[table["image_id"].isin(real["id"])]["backend"]) == {"alt-text"}
    failures = pd.read_csv(result.failures)
    assert len(failures) == 1 and "no alt text" in failures["reason"].iloc[0]
    assert {"id", "shard", "member", "domain", "captions"} <= set(manifest.columns)
    run_caption_gate(table, ingested / "cap")
    assert (ingested / "cap" / "caption_ge_result.json").is_file()
    assert "captions: passed" in (ingested / "cap" / "caption_ge_result.html").read_text()


def test_rerun_resumes_and_keeps_the_hash(ingested):
    first = run_recaption(ingested / "ingest", ingested / "cap2", progress=False)
    again = run_recaption(ingested / "ingest", ingested / "cap2", progress=False)
    assert again.dataset_hash == first.dataset_hash and again.captions_written == first.captions_written


def test_vlm_failures_are_retried_then_reported(ingested):
    calls = []

    def flaky(images):
        calls.append(len(images))
        return [({}, "unparsable output")] * len(images)

    result = run_recaption(ingested / "ingest", ingested / "cap3", backend="vlm", vlm=flaky, progress=False)
    assert result.images == 0 and result.failed == len(
        pd.read_parquet(ingested / "ingest" / "manifest.parquet")
    )
    assert len(calls) == 2  # one try and one retry of the same batch
    assert "unparsable output" in pd.read_csv(result.failures)["reason"].iloc[0]


def test_gate_rejects_missing_granularity_disorder_and_wrong_language(ingested):
    table = pd.read_parquet(run_recaption(ingested / "ingest", ingested / "cap4", progress=False).captions)
    missing = table.drop(
        table[(table["backend"] == "metadata") & (table["granularity"] == "medium")].index[:1]
    )
    with pytest.raises(GateFailed, match="missing_required"):
        run_caption_gate(missing, ingested / "gate1")
    swapped = table.copy()
    detailed = swapped.index[(swapped["granularity"] == "detailed") & (swapped["language"] == "en")][0]
    swapped.loc[detailed, "text"] = "tiny"
    with pytest.raises(GateFailed, match="len_detailed"):
        run_caption_gate(swapped, ingested / "gate2")
    wrong = table.copy()
    wrong.loc[wrong.index[(wrong["language"] == "zh") & (wrong["granularity"] == "short")][0], "text"] = (
        "a cat"
    )
    with pytest.raises(GateFailed, match="language_matches"):
        run_caption_gate(wrong, ingested / "gate3")


def test_bad_inputs_are_clear_errors(tmp_path):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="ingest manifest not found"):
        run_recaption(tmp_path / "nothing", tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown caption backend"):
        run_recaption(tmp_path, tmp_path / "out", backend="gpt")


def test_vlm_backend_with_a_tiny_qwen2vl_reports_instead_of_inventing(ingested, tmp_path):
    from components.recaption.recaption import vlm_function
    from components.recaption.tiny_vlm import build_tiny_qwen2vl

    model = build_tiny_qwen2vl(tmp_path / "qwen2vl")
    vlm = vlm_function(model, max_new_tokens=8, batch_size=4)
    result = run_recaption(ingested / "ingest", ingested / "cap5", backend="vlm", vlm=vlm, progress=False)
    n = len(pd.read_parquet(ingested / "ingest" / "manifest.parquet"))
    # random weights: nothing parsable, so every image is reported, none gets made-up captions
    assert result.images + result.failed == n and result.captions_written == 8 * result.images
    reasons = pd.read_csv(result.failures)["reason"]
    assert all(r.startswith("vlm: ") for r in reasons)
    info = __import__("json").loads((ingested / "cap5" / "dataset.json").read_text())
    assert info["vlm_model"] == str(model) and info["prompt_version"] == "unicap-v2"
    assert info["vlm_perspectives"] == list(PERSPECTIVES)
    assert info["vlm_max_pixels"] == 16 * 28 * 28  # the tiny processor's own budget (native resolution)


def test_interrupted_run_resumes_from_saved_shards(ingested, monkeypatch):
    import components.recaption.recaption as rc
    from components.recaption.schema import GRANULARITIES, LANGUAGES

    monkeypatch.setattr(rc, "SHARD", 4)
    full = {
        lang: {g: f"{g} caption" if lang == "en" else f"{g}的图" for g in GRANULARITIES} for lang in LANGUAGES
    }
    seen: list[int] = []

    class Stop(BaseException):
        pass

    def vlm(images, fail_at=None):
        seen.append(len(images))
        if fail_at is not None and len(seen) == fail_at:
            raise Stop
        return [(full, None)] * len(images)

    out = ingested / "cap6"
    with pytest.raises(Stop):
        run_recaption(ingested / "ingest", out, backend="vlm", vlm=lambda ims: vlm(ims, 2), progress=False)
    assert len(list((out / "shards").glob("*.parquet"))) == 1  # the first shard was saved
    seen.clear()
    result = run_recaption(ingested / "ingest", out, backend="vlm", vlm=vlm, progress=False)
    n = len(pd.read_parquet(ingested / "ingest" / "manifest.parquet"))
    assert sum(seen) == n - 4 and result.images == n and result.captions_written == 8 * n
    assert not list((out / "shards").glob("*.parquet"))
