"""Tiering: nested, resolution-respecting, deterministic; scorers measure what they claim."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from components.ingest.ingest import ingest
from components.recaption.recaption import run_recaption
from components.tier.registry import available
from components.tier.scorers.builtin import colorfulness, exposure, sharpness
from components.tier.tier import run_tier
from components.tier.tiering import TierConfig, assign_tiers
from data_tools.synthetic import build_synthetic


def test_scorers_order_obvious_cases():
    rng = np.random.default_rng(0)
    sharp = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    blurred = sharp.filter(ImageFilter.GaussianBlur(4))
    assert sharpness(sharp, {}) > 5 * sharpness(blurred, {})
    grey, dark = Image.new("RGB", (64, 64), (128,) * 3), Image.new("RGB", (64, 64), (3,) * 3)
    assert exposure(grey, {}) > 0.95 > 0.05 > exposure(dark, {})
    assert colorfulness(Image.new("RGB", (64, 64), (220, 20, 20)), {}) > colorfulness(grey, {}) == 0.0
    with pytest.raises(Exception, match="unknown scorer"):
        available(["nope"])


def _frame(n: int, rng) -> pd.DataFrame:
    sides = rng.choice([64, 96, 128, 256], size=n)
    return pd.DataFrame(
        {
            "id": [f"i{k:03d}" for k in range(n)],
            "score": rng.random(n),
            "width": sides,
            "height": sides,
            "nsfw": rng.random(n) * 0.6,
        }
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiers_are_nested_respect_resolution_and_are_deterministic(seed):
    rng = np.random.default_rng(seed)
    frame = _frame(300, rng)
    cfg = TierConfig(min_side={"lowres": 64, "highres": 128, "hq": 256})
    tiers = assign_tiers(frame, cfg)
    low, high, hq = (set(tiers[k]["id"]) for k in ("lowres", "highres", "hq"))
    assert hq <= high <= low and len(hq) < len(high) < len(low)
    assert (tiers["highres"][["width", "height"]].min(axis=1) >= 128).all()
    assert (tiers["hq"][["width", "height"]].min(axis=1) >= 256).all()
    assert (tiers["lowres"]["nsfw"] <= cfg.nsfw_threshold).all()
    assert tiers["hq"]["score"].min() >= tiers["highres"]["score"].min()
    again = assign_tiers(frame.sample(frac=1.0, random_state=seed), cfg)
    assert all(list(again[k]["id"]) == list(tiers[k]["id"]) for k in tiers)


def test_ratios_follow_the_paper_with_floors():
    rng = np.random.default_rng(0)
    frame = _frame(8000, rng)
    frame[["width", "height"]] = 1024
    tiers = assign_tiers(frame.drop(columns="nsfw"), TierConfig())
    assert len(tiers["highres"]) == 800 and len(tiers["hq"]) == 80
    # a small set keeps usable tiers: the floors (128 high-res, 64 HQ images), never more than it has
    small = assign_tiers(frame.head(400).drop(columns="nsfw"), TierConfig())
    assert len(small["highres"]) == 128 and len(small["hq"]) == 64
    tiny = assign_tiers(frame.head(40).drop(columns="nsfw"), TierConfig())
    assert len(tiny["highres"]) == len(tiny["hq"]) == 40


def test_tiers_keep_each_domain_s_share():
    """Quality is ranked within a domain: a domain whose scores are all lower (flat synthetic art)
    still gets its share of every tier; stratify_by=None cuts by the global score instead."""
    rng = np.random.default_rng(1)
    frame = _frame(1000, rng).drop(columns="nsfw")
    frame[["width", "height"]] = 1024
    frame["domain"] = ["synthetic" if i % 4 == 0 else "real" for i in range(len(frame))]
    frame.loc[frame["domain"] == "synthetic", "score"] -= 2.0  # below every real image
    cfg = TierConfig(highres_ratio=0.2, hq_ratio=0.1, min_highres_images=1, min_hq_images=1)
    tiers = assign_tiers(frame, cfg)
    for tier, size in (("highres", 200), ("hq", 100)):
        shares = tiers[tier]["domain"].value_counts()
        assert len(tiers[tier]) == size and shares["synthetic"] == size // 4, (tier, shares)
        real = tiers[tier][tiers[tier]["domain"] == "real"]  # the best of each domain
        pool = frame[frame["domain"] == "real"]["score"]
        assert real["score"].min() >= pool.quantile(1 - size / 1000 - 0.01)
    assert set(tiers["hq"]["id"]) <= set(tiers["highres"]["id"])
    flat = assign_tiers(frame, cfg.model_copy(update={"stratify_by": None}))
    assert (flat["highres"]["domain"] == "real").all()


def test_bad_tier_config_is_rejected():
    with pytest.raises(ValueError, match="nested"):
        TierConfig(highres_ratio=0.01, hq_ratio=0.1)


@pytest.mark.slow
def test_run_tier_end_to_end(tmp_path):
    build_synthetic(tmp_path / "raw", n=40, size=128)
    ingest(tmp_path / "raw", tmp_path / "ingest")
    run_recaption(tmp_path / "ingest", tmp_path / "cap", progress=False)
    result = run_tier(tmp_path / "cap", tmp_path / "ingest", tmp_path / "tiers", progress=False)
    frames = {k: pd.read_parquet(tmp_path / "tiers" / f"{k}.parquet") for k in ("lowres", "highres", "hq")}
    assert set(frames["hq"]["id"]) <= set(frames["highres"]["id"]) <= set(frames["lowres"]["id"])
    assert len(frames["hq"]) >= 8 and set(frames["hq"]["system_prompt"]) == {"A"}  # synthetic → Template A
    report = json.loads(result.report.read_text())
    assert report["counts"] == result.counts and (tmp_path / "tiers" / "report" / "hist_score.png").is_file()
    from components.train.data import read_manifest
    from storage.shards import image_bytes

    records = read_manifest(tmp_path / "tiers" / "hq.parquet", image_root=tmp_path / "ingest")
    assert len(records) == len(frames["hq"])
    for row in frames["hq"].to_dict("records"):  # every training image is read from its shard
        assert hashlib.sha256(image_bytes(row)).hexdigest()[:16] == row["id"]
    again = run_tier(tmp_path / "cap", tmp_path / "ingest", tmp_path / "tiers2", progress=False)
    assert again.dataset_hash == result.dataset_hash


def test_lower_is_better_scores_are_inverted():
    from components.tier.tiering import combined_score

    frame = pd.DataFrame({"sharpness": [1.0, 2.0, 3.0], "niqe": [1.0, 2.0, 3.0]})
    assert list(combined_score(frame, {"sharpness": 1.0})) == [1 / 3, 2 / 3, 1.0]
    assert list(combined_score(frame, {"niqe": 1.0}, frozenset({"niqe"}))) == [1.0, 2 / 3, 1 / 3]


def test_a_scorer_without_weights_is_reported_not_faked(tmp_path, monkeypatch):
    from common.errors import WeightsNotFoundError
    from components.tier import registry
    from components.tier.registry import Scorer

    def missing():
        raise WeightsNotFoundError("weights for fake not found")

    monkeypatch.setitem(registry.SCORERS, "fake", Scorer("fake", "1", lambda i, r: 1.0, prepare=missing))
    build_synthetic(tmp_path / "raw", n=12, size=128)
    ingest(tmp_path / "raw", tmp_path / "ingest")
    run_recaption(tmp_path / "ingest", tmp_path / "cap", progress=False)
    names = ["sharpness", "fake"]
    result = run_tier(tmp_path / "cap", tmp_path / "ingest", tmp_path / "t", None, names, progress=False)
    report = json.loads(result.report.read_text())
    assert report["scorers_not_run"] == {"fake": "weights for fake not found"}
    assert "fake" not in pd.read_parquet(tmp_path / "t" / "scores.parquet").columns


def test_a_scorer_crashing_on_some_images_reports_them_and_tiers_the_rest(tmp_path, monkeypatch):
    from common.errors import LuminaError
    from components.tier import registry
    from components.tier.registry import Scorer

    build_synthetic(tmp_path / "raw", n=24, size=128)
    ingest(tmp_path / "raw", tmp_path / "ingest")
    run_recaption(tmp_path / "ingest", tmp_path / "cap", progress=False)
    manifest = pd.read_parquet(tmp_path / "cap" / "manifest.parquet")
    unlucky = set(manifest["id"][:3])

    def fragile(image, row):
        if row["id"] in unlucky:
            raise RuntimeError("onnxruntime: invalid input shape")
        return 1.0

    monkeypatch.setitem(registry.SCORERS, "fragile", Scorer("fragile", "1", fragile))
    names = ["sharpness", "fragile"]
    result = run_tier(tmp_path / "cap", tmp_path / "ingest", tmp_path / "t", None, names, progress=False)
    lowres = pd.read_parquet(tmp_path / "t" / "lowres.parquet")
    heldout = set(pd.read_parquet(tmp_path / "t" / "heldout.parquet")["id"])  # tiers exclude it
    assert not unlucky & (set(lowres["id"]) | heldout) and not heldout & set(lowres["id"])
    assert len(lowres) + len(heldout) == len(manifest) - 3 and len(heldout) == result.heldout >= 4
    report = json.loads(result.report.read_text())
    assert "scorer fragile: RuntimeError: onnxruntime: invalid input shape" in json.dumps(report)

    monkeypatch.setitem(registry.SCORERS, "broken", Scorer("broken", "1", lambda i, r: 1 / 0))
    with pytest.raises(LuminaError, match=r"no image could be scored .*ZeroDivisionError"):
        run_tier(tmp_path / "cap", tmp_path / "ingest", tmp_path / "t2", None, ["broken"], progress=False)


NO_HELDOUT = {"heldout_fraction": 0.0, "min_heldout_images": 0, "min_heldout_per_domain": 0}
"""Every image in the tiers: tests of exact tier shares (the split is tested in test_heldout.py)."""


def _captions(*pairs: tuple[str, str]) -> str:
    return json.dumps(
        [{"granularity": "detailed", "language": lang, "text": text} for lang, text in pairs],
        ensure_ascii=False,
    )


def _tier_folders(tmp_path, manifest: pd.DataFrame, scores: pd.DataFrame, scorers: list[dict], config):
    """Tier a hand-made captioned manifest and its scores through the fan-in, as the pipeline does."""
    from components.tier.tier import tier_groups

    (tmp_path / "cap").mkdir()
    (tmp_path / "score").mkdir()
    manifest = manifest.assign(image_path=[f"images/{i}.png" for i in manifest["id"]])
    manifest.to_parquet(tmp_path / "cap" / "manifest.parquet", index=False)
    scores.assign(error=None).to_parquet(tmp_path / "score" / "scores.parquet", index=False)
    meta = {"scorers": scorers, "not_run": {}, "images": len(manifest)}
    (tmp_path / "score" / "scorers.json").write_text(json.dumps(meta))
    result = tier_groups([tmp_path / "cap"], [tmp_path / "score"], tmp_path / "tiers", config)
    files = {k: tmp_path / "tiers" / f"{k}.parquet" for k in ("lowres", "highres", "hq", "text")}
    return result, {k: pd.read_parquet(f) for k, f in files.items() if f.is_file()}


def test_caption_units_count_cjk_by_character():
    from components.tier.captions import caption_units
    from components.tier.scorers.builtin import caption_richness

    assert caption_units("一只猫坐在窗台上") == 8 and caption_units("a cat on a sill") == 5
    assert caption_units("海报上写着 SALE 50%") == 5 + 2  # characters + the words around them
    row = {"captions": _captions(("en", "a red bus"), ("en", "bus"), ("zh", "一辆红色的公共汽车"))}
    assert caption_richness(None, row) == (3 + 9) / 2  # longest per language, mean over languages
    assert caption_richness(None, {"captions": "[]"}) == 0.0
    spatial = {"granularity": "spatial", "language": "en", "text": "a bus left of a tree " * 5}
    long_spatial = json.dumps([{"granularity": "short", "language": "en", "text": "a red bus"}, spatial])
    assert caption_richness(None, {"captions": long_spatial}) == 3  # perspectives are not lengths


def test_caption_richness_does_not_favour_a_caption_source(tmp_path):
    """Two sources with very different caption lengths (short English metadata captions; long
    English + Chinese VLM captions), images of equal quality: each source gets the same share of
    every tier, because caption richness is ranked within its source and languages."""
    from components.tier.scorers.builtin import caption_richness

    n = 100
    order = [(37 * i) % n for i in range(n)]  # the same richness order inside both sources
    rows = []
    for i, k in enumerate(order):
        short = " ".join(["tag"] * (2 + k))
        long_en, long_zh = " ".join(["word"] * (60 + 3 * k)), "猫" * (150 + 5 * k)
        rows.append(
            {"id": f"a{i:03d}", "caption_backend": "metadata", "domain": "synthetic",
             "captions": _captions(("en", short)), "sharpness": float(i)}
        )  # fmt: skip
        rows.append(
            {"id": f"b{i:03d}", "caption_backend": "vlm", "domain": "real",
             "captions": _captions(("en", long_en), ("zh", long_zh)), "sharpness": float(i)}
        )  # fmt: skip
    frame = pd.DataFrame(rows).assign(width=512, height=512)
    frame["caption_richness"] = [caption_richness(None, r) for r in frame.to_dict("records")]
    vlm = frame["caption_backend"] == "vlm"
    assert frame.loc[vlm, "caption_richness"].min() > frame.loc[~vlm, "caption_richness"].max()
    scorers = [{"name": "sharpness", "version": "1"}, {"name": "caption_richness", "version": "2"}]
    config = TierConfig(weights={"sharpness": 1.0, "caption_richness": 1.0}, **NO_HELDOUT)
    manifest = frame.drop(columns=["sharpness", "caption_richness"])
    _, tiers = _tier_folders(
        tmp_path, manifest, frame[["id", "sharpness", "caption_richness"]], scorers, config
    )
    for name in ("highres", "hq"):
        shares = tiers[name]["id"].str[0].value_counts().to_dict()
        assert shares.get("a") == shares.get("b") == len(tiers[name]) // 2, (name, shares)


def test_text_in_an_image_does_not_lower_its_tier_and_is_routed(tmp_path):
    """Each text-heavy image has a plain twin of the same quality: they land in the same tiers; the
    text-heavy ones are flagged ``text_rich`` and listed in ``text.parquet`` and the report."""
    n = 30
    ids = [f"{kind}{i:03d}" for i in range(n) for kind in ("p", "t")]
    caption = _captions(("en", "a poster"))
    manifest = pd.DataFrame(
        {"id": ids, "caption_backend": "metadata", "domain": "synthetic", "captions": caption,
         "width": 256, "height": 256}
    )  # fmt: skip
    scores = pd.DataFrame({
        "id": ids,
        "sharpness": [float(i[1:]) for i in ids],
        "text_density": [0.4 if i[0] == "t" else 0.0 for i in ids],
    })  # fmt: skip
    scorers = [{"name": "sharpness", "version": "1"},
               {"name": "text_density", "version": "1", "higher_is_better": False}]  # fmt: skip
    config = TierConfig(**NO_HELDOUT, min_highres_images=16, min_hq_images=8)  # tiers smaller than the set
    result, tiers = _tier_folders(tmp_path, manifest, scores, scorers, config)
    for name in ("highres", "hq"):
        members = set(tiers[name]["id"])
        assert len(members) < 2 * n and all((f"p{i:03d}" in members) == (f"t{i:03d}" in members)
                                            for i in range(n)), name  # fmt: skip
    low = tiers["lowres"].set_index("id")
    assert low["text_rich"].to_dict() == {i: i[0] == "t" for i in ids}
    assert sorted(tiers["text"]["id"]) == [i for i in sorted(ids) if i[0] == "t"]
    assert list(tiers["text"].columns) == list(tiers["hq"].columns)  # the same training manifest
    report = json.loads(result.report.read_text())["text_rich"]
    assert report["scored"] and report["counts"] == {
        name: int(tiers[name]["text_rich"].sum()) for name in ("lowres", "highres", "hq")
    }
    assert report["counts"]["lowres"] == n and report["counts"]["hq"] == len(tiers["hq"]) // 2


def test_text_density_cannot_be_weighted():
    with pytest.raises(ValueError, match="text_density routes images"):
        TierConfig(weights={"sharpness": 1.0, "text_density": 0.5})
    assert "text_density" not in TierConfig().weights
    TierConfig(weights={"sharpness": 1.0, "text_density": 0.0})  # no weight: allowed


def test_tier_manifests_keep_the_columns_downstream_reads(tmp_path):
    """Latents and training read these; ``text_rich`` and ``split`` are only added."""
    from components.tier.tier import TRAIN_COLUMNS
    from storage.shards import REF_COLUMNS

    old = ["id", "image_path", "domain", "captions", "system_prompt", "score", "width", "height",
           *REF_COLUMNS]  # fmt: skip
    assert TRAIN_COLUMNS[: len(old)] == old and TRAIN_COLUMNS[len(old) :] == ["text_rich", "split"]
