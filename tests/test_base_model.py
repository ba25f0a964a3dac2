"""``base_model``: the first stage (and the latent step's VAE) start from given weights — a folder,
an ``s3://`` prefix on the loopback server, a registry version or a hub id — instead of a random
model."""

from pathlib import Path

import pytest
import torch

from common.errors import ConfigError, WeightsNotFoundError
from components.latents.group import stage_vae
from components.train.data import fingerprint
from components.train.launch import base_model_source
from model.checkpoint import build_pipeline, load_pipeline, pipeline_vae, save_pipeline
from pipelines.cli import check_base_model
from storage import upload_file

HUB_ID = "Alpha-VLLM/Lumina-Image-2.0"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny model in the released (diffusers) layout, other weights than the profile's default."""
    return save_pipeline(build_pipeline("tiny", seed=7), tmp_path_factory.mktemp("base") / "lumina-base")


@pytest.fixture(scope="module")
def s3_base(s3, base) -> str:
    for path in base.rglob("*"):
        if path.is_file():
            upload_file(path, f"s3://lumina/models/base/{path.relative_to(base).as_posix()}")
    return "s3://lumina/models/base"


def test_sources_resolve_for_the_first_stage(tmp_path, base, s3_base):
    work = tmp_path / "work"
    assert base_model_source(str(base), work) == str(base)  # a folder is used in place
    fetched = Path(base_model_source(s3_base, work))
    assert fetched == work / "inputs" / "base" and (fetched / "model_index.json").is_file()
    assert base_model_source(s3_base, work) == str(fetched)  # a retry reuses the download
    assert base_model_source(HUB_ID, work) == HUB_ID  # diffusers loads it from the HF cache
    with pytest.raises(WeightsNotFoundError, match="model folder not found"):
        base_model_source(str(tmp_path / "missing"), work)
    with pytest.raises(WeightsNotFoundError, match="no objects under s3://lumina/models/none"):
        base_model_source("s3://lumina/models/none", tmp_path / "other")


def test_the_latent_step_encodes_with_the_base_models_vae(tmp_path, base, s3_base):
    want = fingerprint(load_pipeline(base).vae)
    assert want != fingerprint(pipeline_vae("tiny", 0))
    assert fingerprint(stage_vae("tiny", 0, str(base))) == want
    assert fingerprint(stage_vae("tiny", 0, s3_base)) == want  # only vae/ is fetched
    assert fingerprint(stage_vae("tiny", 0, "")) == fingerprint(pipeline_vae("tiny", 0))
    with pytest.raises(WeightsNotFoundError, match="no VAE under s3://lumina/models/none"):
        stage_vae("tiny", 0, "s3://lumina/models/none")
    with pytest.raises(WeightsNotFoundError, match="no VAE in"):
        stage_vae("tiny", 0, str(tmp_path))


@pytest.mark.slow
def test_the_first_stage_trains_from_the_base_weights(tmp_path, base):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from components.train.config import stage_config
    from components.train.trainer import train_stage
    from tests.shapes import make_manifest

    manifest = make_manifest(tmp_path / "data", n=8)
    cfg = stage_config("lowres", manifest=manifest, output_dir=tmp_path / "run", init_from=base, steps=2,
                       global_batch=2, micro_batch=2, track=False)  # fmt: skip
    exported = load_pipeline(train_stage(cfg).pipeline_dir)
    start = load_pipeline(base)
    for name in ("text_encoder", "vae"):  # frozen: exactly the base model's
        a, b = getattr(start, name).state_dict(), getattr(exported, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    moved = exported.transformer.state_dict()
    ref = start.transformer.state_dict()
    assert any(not torch.equal(ref[k], moved[k]) for k in ref)  # trained from there


def test_the_cli_checks_a_local_base_model_before_running(tmp_path, base):
    assert check_base_model(str(base), local=True) == str(base.resolve())
    assert check_base_model(HUB_ID, local=True) == HUB_ID
    assert check_base_model("s3://bucket/model", local=False) == "s3://bucket/model"
    with pytest.raises(ConfigError, match=r"--base-model .*missing: not found"):
        check_base_model(str(tmp_path / "missing"), local=True)
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        check_base_model(str(tmp_path), local=True)


def test_a_registry_version_is_a_base_model(tmp_path, base, monkeypatch):
    from components.register.register import register_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the registry's default artifact root (./mlruns) goes here
    register_model(base, "lumina-base", uri, {"val_loss": 1.0})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    fetched = Path(base_model_source("models:/lumina-base@champion", tmp_path / "work"))
    assert (fetched / "model_index.json").is_file()
    assert fingerprint(stage_vae("tiny", 0, "models:/lumina-base@champion")) == fingerprint(
        load_pipeline(base).vae
    )
    with pytest.raises(WeightsNotFoundError, match="cannot resolve models:/lumina-base@nope"):
        base_model_source("models:/lumina-base@nope", tmp_path / "other")
