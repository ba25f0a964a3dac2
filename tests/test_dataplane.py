"""The sharded, fanned-out data plane: one group or many give the same result; bad input is
reported per shard/member or as one line naming the group / location; retries lose nothing."""

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.errors import ConfigError
from components.ingest.group import ingest_group
from components.ingest.ingest import IngestOptions
from components.ingest.merge import merge_groups
from components.plan.plan import Group, plan_source
from components.recaption.recaption import merge_captions, recaption_group
from components.tier.tier import score_group, tier_groups
from components.tier.tiering import TierConfig
from data_tools.synthetic import build_synthetic

SCORERS = ["resolution", "sharpness", "exposure", "contrast", "colorfulness", "caption_richness"]


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Synthetic scenes (ground-truth captions) plus photos with alt text, and duplicates placed so
    that they cross group boundaries: an exact copy and a near copy of early images late in the
    listing, and a WebDataset shard holding a copy too."""
    root = tmp_path_factory.mktemp("plane") / "src"
    build_synthetic(root / "a_synthetic", n=24, size=64)
    photos = root / "b_photos"
    photos.mkdir()
    for i in range(8):
        _photo(96, 80, i).save(photos / f"p{i}.png")
        (photos / f"p{i}.txt").write_text(f"A photo of coloured noise number {i}.")
    late = root / "c_late"
    late.mkdir()
    (late / "copy.png").write_bytes((photos / "p0.png").read_bytes())  # exact duplicate, other group
    near = np.asarray(Image.open(photos / "p1.png")).copy()
    near[0, 0] = (near[0, 0].astype(int) + 3) % 256
    Image.fromarray(near).save(late / "near.png")  # near duplicate, other group
    with tarfile.open(root / "d_shard.tar", "w") as tar:
        for name, data in [("s1.png", _png(_photo(80, 80, 50))), ("s1.txt", b"A shard photo."),
                           ("s2.png", (photos / "p2.png").read_bytes())]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def _run_plane(source, out, group_size: int) -> dict:
    """plan → ingest per group → merge → recaption + score per group → captions merge → tiers."""
    opts = IngestOptions(shard_size=5)
    plan = plan_source(
        str(source), str(out / "data"), group_size=group_size, options=opts.fingerprint_fields()
    )
    dirs = []
    for group in plan.groups:  # as the ParallelFor tasks would, each from its JSON item
        dirs.append(ingest_group(Group.from_json(group.to_json()), out / "ingest" / group.name, opts))
    merged = merge_groups([d.out_dir for d in reversed(dirs)], plan.groups, out / "merged", opts)  # any order
    cap_dirs, score_dirs = [], []
    for group in plan.groups:
        recaption_group(group, out / "cap" / group.name, progress=False)
        score_group(out / "cap" / group.name, out / "score" / group.name, SCORERS, progress=False)
        cap_dirs.append(out / "cap" / group.name)
        score_dirs.append(out / "score" / group.name)
    captions = merge_captions(cap_dirs, plan.groups, out / "captions")
    config = TierConfig(
        min_highres_images=4, min_hq_images=2, min_side={"lowres": 32, "highres": 64, "hq": 64}
    )
    tiers = tier_groups(cap_dirs, score_dirs, out / "tiers", config)
    rejects = pd.read_csv(merged.rejects)
    return {
        "groups": len(plan.groups),
        "kept": sorted(pd.read_parquet(merged.manifest)["id"]),
        "dataset_hash": merged.dataset_hash,
        "rejects": dict(zip(rejects["source"], rejects["reason"], strict=True)),
        "captions": pd.read_parquet(captions.captions)
        .sort_values(["image_id", "language", "granularity"])
        .reset_index(drop=True),
        "captions_hash": captions.dataset_hash,
        "tiers": {n: sorted(pd.read_parquet(out / "tiers" / f"{n}.parquet")["id"]) for n in tiers.counts},
        "tiers_hash": tiers.dataset_hash,
    }


def test_one_group_and_many_groups_give_the_same_data(source, tmp_path):
    single = _run_plane(source, tmp_path / "single", group_size=10_000)
    fanned = _run_plane(source, tmp_path / "fanned", group_size=12)
    assert single["groups"] == 1 and fanned["groups"] >= 3
    assert fanned["kept"] == single["kept"] and fanned["dataset_hash"] == single["dataset_hash"]
    assert fanned["rejects"] == single["rejects"]  # the same sources rejected for the same reasons
    reasons = {k.rsplit("/", 1)[-1]: v for k, v in single["rejects"].items()}
    assert reasons["copy.png"].startswith("duplicate_of:")  # decided across groups in the fan-in
    assert reasons["near.png"].startswith("near_duplicate_of:")
    assert reasons["d_shard.tar::s2.png"].startswith("duplicate_of:")
    pd.testing.assert_frame_equal(fanned["captions"], single["captions"])
    assert fanned["captions_hash"] == single["captions_hash"]
    assert fanned["tiers"] == single["tiers"] and fanned["tiers_hash"] == single["tiers_hash"]
    assert len(single["tiers"]["hq"]) >= 2


def test_truncated_or_unreadable_source_shards_are_reported_and_the_rest_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _photo(64, 64, 1).save(src / "a.png")
    with tarfile.open(src / "good.tar", "w") as tar:
        for i in range(3):
            data = _png(_photo(64, 64, 10 + i))
            info = tarfile.TarInfo(f"k{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = (src / "good.tar").read_bytes()
    (src / "truncated.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut inside a member
    (src / "garbage.tar").write_bytes(b"this is not a tar file at all" * 40)
    for name in ("zz0.png", "zz1.png"):  # the last group: every image corrupt, nothing kept
        (src / name).write_bytes(b"not an image")
    opts = IngestOptions()
    plan = plan_source(str(src), str(tmp_path / "data"), group_size=2)
    dirs = [ingest_group(g, tmp_path / g.name, opts, progress=False).out_dir for g in plan.groups]
    merged = merge_groups(dirs, plan.groups, tmp_path / "merged", opts)
    rejects = pd.read_csv(merged.rejects)
    bad = {s.rsplit("/", 1)[-1]: r for s, r in zip(rejects["source"], rejects["reason"], strict=True)}
    assert bad["garbage.tar::"].startswith("unreadable_shard")
    assert bad["truncated.tar::k2.png"].startswith("unreadable_member")  # shard and member named
    assert bad["truncated.tar::"].startswith("truncated_shard")
    assert bad["truncated.tar::k0.png"].startswith("duplicate_of:")  # members before the cut were read
    assert bad["zz0.png"] == bad["zz1.png"] == "not_an_image"
    kept = pd.read_parquet(merged.manifest)
    assert merged.kept == 4  # a.png and the three members of the good shard; copies in the cut one are dups
    assert set(kept["source_path"].str.rsplit("/", n=1).str[-1]) >= {"a.png", "good.tar::k0.png"}


def test_fan_in_with_a_missing_group_names_it(source, tmp_path):
    plan = plan_source(str(source), str(tmp_path / "data"), group_size=12)
    first = plan.groups[0]
    ingest_group(first, tmp_path / first.name, progress=False)
    with pytest.raises(ConfigError, match=rf"group {plan.groups[1].name} \(\+\d+ more\) has no output"):
        merge_groups([tmp_path / first.name], plan.groups, tmp_path / "merged")
    with pytest.raises(ConfigError, match="recaption fan-in: group g00000"):
        merge_captions([], plan.groups[:1], tmp_path / "captions")
    with pytest.raises(ConfigError, match="not a plan group"):
        Group.from_json("{broken")


def test_a_retried_group_keeps_its_shards_and_touches_no_other_group(source, tmp_path):
    opts = IngestOptions(shard_size=4)
    plan = plan_source(str(source), str(tmp_path / "data"), group_size=12)
    a, b = plan.groups[0], plan.groups[1]
    ingest_group(b, tmp_path / "b", opts, progress=False)
    b_files = {
        p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob(f"groups/{b.name}/**/*") if p.is_file()
    }
    first = ingest_group(a, tmp_path / "a1", opts, progress=False)
    shards = sorted((tmp_path / "data").rglob(f"groups/{a.name}/shards/*.tar"))
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    retry = ingest_group(a, tmp_path / "a2", opts, progress=False)  # a retried task: fresh artifact folder
    assert retry.resumed_parts == len(shards) and retry.candidates == first.candidates
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps  # finished shards were not rewritten
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "a1" / "manifest.parquet"),
        pd.read_parquet(tmp_path / "a2" / "manifest.parquet"),
    )
    assert {p: p.stat().st_mtime_ns for p in b_files} == b_files


def test_missing_or_unreadable_locations_are_one_line(tmp_path, monkeypatch):
    from services.s3 import DUMMY_CREDENTIALS, s3_server

    with pytest.raises(ConfigError, match="ingest source not found"):
        plan_source(str(tmp_path / "nowhere"), str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="no data root"):
        plan_source(str(tmp_path), "")
    for key, value in {**DUMMY_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(ConfigError) as err:
            plan_source("s3://no-such-bucket/raw/", str(tmp_path / "data"))
        assert "\n" not in str(err.value) and "does not exist" in str(err.value)
        from storage import s3_client

        s3_client().create_bucket(Bucket="empty")
        with pytest.raises(ConfigError, match="nothing under s3://empty/raw/"):
            plan_source("s3://empty/raw/", str(tmp_path / "data"))


def test_plan_fingerprint_follows_the_content(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _photo(64, 64, 1).save(src / "a.png")
    first = plan_source(str(src), str(tmp_path / "data"))
    assert plan_source(str(src), str(tmp_path / "data")).fingerprint == first.fingerprint  # unchanged
    _photo(64, 64, 2).save(src / "b.png")
    second = plan_source(str(src), str(tmp_path / "data"))
    assert second.fingerprint != first.fingerprint and second.key != first.key
    summary = json.loads((tmp_path / "data" / second.key.rsplit("/", 1)[-1] / "plan.json").read_text())
    assert summary["entries"] == 2 and len(summary["groups"]) == 1


@pytest.fixture(scope="module")
def tiered(source, tmp_path_factory):
    """The source planned, ingested, captioned, scored and tiered per group (the latent and grid
    steps' inputs): ``(plan, work folder)``."""
    work = tmp_path_factory.mktemp("tiered")
    opts = IngestOptions()
    plan = plan_source(str(source), str(work / "data"), group_size=12)
    dirs = [ingest_group(g, work / "ing" / g.name, opts, progress=False).out_dir for g in plan.groups]
    merge_groups(dirs, plan.groups, work / "merged", opts)
    for g in plan.groups:
        recaption_group(g, work / "cap" / g.name, progress=False)
        score_group(work / "cap" / g.name, work / "score" / g.name, SCORERS, progress=False)
    config = TierConfig(
        min_highres_images=4, min_hq_images=2, min_side={"lowres": 32, "highres": 64, "hq": 64}
    )
    caps = [work / "cap" / g.name for g in plan.groups]
    scores = [work / "score" / g.name for g in plan.groups]
    tier_groups(caps, scores, work / "tiers", config, plan.groups)
    return plan, work


def test_latent_step_per_group_covers_each_stage_tier(tiered, tmp_path):
    from components.latents import LatentStore, read_latent_index
    from components.latents.group import latents_group, stage_resolutions

    plan, work = tiered
    for g in plan.groups:
        latents_group(g, tmp_path / "idx" / g.name, profile="tiny")
    index = read_latent_index(tmp_path / "idx")  # what the train step gets (all groups' indexes)
    wanted = stage_resolutions("tiny")
    tiers = {n: set(pd.read_parquet(work / "tiers" / f"{n}.parquet")["id"]) for n in ("lowres", "highres")}
    for resolution, tier in wanted.items():
        at = index[index["resolution"] == resolution]
        assert set(at["id"]) == tiers[tier] and at["file"].str.endswith(".safetensors").all()
    store = LatentStore(index[index["resolution"] == min(wanted)])
    some = next(iter(tiers["lowres"]))
    assert store[some].dtype.is_floating_point and store[some].shape[0] == 16  # 16-channel latents
    stamps = {p: p.stat().st_mtime_ns for p in (work / "data").rglob("*.safetensors")}
    latents_group(plan.groups[0], tmp_path / "idx-again" / plan.groups[0].name, profile="tiny")  # a retry
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # reused, not re-encoded


def test_grid_step_feeds_the_unified_stage_only(tiered, tmp_path):
    """The grid step's grids (exact maps for the synthetic scenes, found through the kept source
    paths) and its ordinary share reach the latent index at the unified resolution, flagged for the
    unified stage only, with Template C training texts; turned off, the unified stage has nothing."""
    from components.grids.group import grids_group, unified_resolution
    from components.latents.group import latents_group
    from components.train.data import caption_texts
    from components.train.loader import StageFilter, sample_record, stage_rows
    from model.prompts import DOMAIN_TEMPLATES, PROMPT_START

    plan, _ = tiered
    group = plan.groups[0]
    config = {"tier": "lowres", "ordinary_share": 0.25, "kinds": {"canny": 1, "mask": 1, "depth": 1}}
    summary = grids_group(group, tmp_path / "grids", profile="tiny", config=config, enabled=True)
    assert summary["grids"] >= 4 and summary["ordinary"] == round(summary["grids"] / 3)
    assert set(summary["kinds"]) <= {"canny", "mask", "depth"}
    assert {"mask", "depth"} & set(summary["kinds"])  # only a scene's exact ground truth has these
    files = latents_group(group, tmp_path / "idx", profile="tiny", grids=tmp_path / "grids")
    res = unified_resolution("tiny")
    index_file = next(str(f) for f in files if f.name.endswith(f"-r{res}.index.parquet"))
    fp = pd.read_parquet(index_file)["vae_fingerprint"].iloc[0]
    unified = stage_rows(index_file, StageFilter(res, fp, "unified"), None)
    grids = unified[unified["domain"] == "grid"]
    assert len(grids) == summary["grids"] and len(unified) == summary["grids"] + summary["ordinary"]
    assert not grids[["lowres", "highres", "hq"]].any().any()  # the other stages never see a grid
    assert len(stage_rows(index_file, StageFilter(res, fp, "highres"), None).query("domain == 'grid'")) == 0
    for row in grids.to_dict("records"):
        record = sample_record(row)
        assert record.grid_fill and (record.height, record.width) != (0, 0)
        for text in caption_texts(record, DOMAIN_TEMPLATES):
            assert text.startswith(("Generate a", "生成一幅")) and PROMPT_START in text
    ordinary = [sample_record(r) for r in unified[unified["domain"] != "grid"].to_dict("records")]
    assert all(not t.startswith("Generate a") for r in ordinary for t in caption_texts(r, DOMAIN_TEMPLATES))

    off = grids_group(group, tmp_path / "off", profile="tiny", enabled=False)
    assert off == {"enabled": False, "group": group.name, "grids": 0, "ordinary": 0}
    files = latents_group(group, tmp_path / "idx-off", profile="tiny", grids=tmp_path / "off")
    index_file = next(str(f) for f in files if f.name.endswith(f"-r{res}.index.parquet"))
    assert stage_rows(index_file, StageFilter(res, fp, "unified"), None).empty
