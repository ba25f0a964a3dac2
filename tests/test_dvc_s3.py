"""DVC and the ingest S3 source against a real moto_server on loopback."""

import hashlib
import json
import shutil
import subprocess

import pandas as pd
import pytest

from common.errors import ConfigError
from components.ingest.ingest import ingest
from data_tools.dvc_remote import DvcError, configure_remote, mirror_remote, pull, push, restore_remote, track
from data_tools.synthetic import build_synthetic
from services.s3 import DUMMY_CREDENTIALS, REGION, ensure_bucket, s3_client, s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for key, value in {**DUMMY_CREDENTIALS, "AWS_DEFAULT_REGION": REGION}.items():
        mp.setenv(key, value)
    with s3_server() as endpoint:
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        yield endpoint
    mp.undo()


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_dvc_round_trip_through_loopback_s3(s3, tmp_path):
    import os

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    env = dict(os.environ)
    from data_tools.dvc_remote import dvc

    dvc("init", "-q", cwd=repo, env=env)
    build_synthetic(repo / "data" / "raw", n=8, size=64)
    before = _hashes(repo / "data" / "raw")
    ensure_bucket("lumina-data", s3)
    configure_remote(repo, "s3://lumina-data/dvc", endpoint=s3, env=env)
    digest = track(repo, "data/raw", env=env)
    assert digest.endswith(".dir")
    push(repo, env=env)
    stored = s3_client(s3).list_objects_v2(Bucket="lumina-data", Prefix="dvc/")["KeyCount"]
    assert stored >= len(before)
    # the embedded default's mirror: the next run's loopback server starts empty and is refilled
    store = tmp_path / "dvc-remote"
    assert mirror_remote("s3://lumina-data/dvc", store) == stored
    assert mirror_remote("s3://lumina-data/dvc", store) == 0  # only what is new
    client = s3_client(s3)
    for obj in client.list_objects_v2(Bucket="lumina-data", Prefix="dvc/")["Contents"]:
        client.delete_object(Bucket="lumina-data", Key=obj["Key"])
    assert restore_remote(store, "s3://lumina-data/dvc") == stored
    shutil.rmtree(repo / "data" / "raw")
    shutil.rmtree(repo / ".dvc" / "cache")
    pull(repo, env=env)
    assert _hashes(repo / "data" / "raw") == before
    with pytest.raises(DvcError, match="dvc push failed"):
        configure_remote(repo, "s3://no-such-bucket/dvc", endpoint=s3, env=env)
        push(repo, env=env)


def test_ingest_from_an_s3_prefix(s3, tmp_path):
    src = tmp_path / "src"
    build_synthetic(src, n=3, size=64)
    ensure_bucket("lumina-raw", s3)
    client = s3_client(s3)
    for path in sorted(src.glob("*.png")):
        client.upload_file(str(path), "lumina-raw", f"incoming/{path.name}")
    client.put_object(Bucket="lumina-raw", Key="incoming/synthetic_00000.txt", Body=b"first scene")
    client.put_object(Bucket="lumina-raw", Key="incoming/broken.png", Body=b"\x89PNG\r\n\x1a\nnot really")
    result = ingest("s3://lumina-raw/incoming/", tmp_path / "out")
    manifest = pd.read_parquet(result.manifest)
    assert result.kept == 3 and result.rejected == 1
    assert manifest["source_path"].str.startswith("s3://lumina-raw/incoming/").all()
    assert "first scene" in set(manifest["caption"])


def test_caption_sidecar_from_s3(s3, tmp_path):
    src = tmp_path / "src"
    build_synthetic(src, n=2, size=64)
    ensure_bucket("lumina-sidecar", s3)
    client = s3_client(s3)
    for path in sorted(src.glob("*.png")):
        client.upload_file(str(path), "lumina-sidecar", f"raw/{path.name}")
    table = pd.DataFrame({"key": ["synthetic_00001"], "caption": ["from the sidecar"]})
    table.to_parquet(tmp_path / "alt.parquet")
    client.upload_file(str(tmp_path / "alt.parquet"), "lumina-sidecar", "meta/alt.parquet")
    result = ingest(
        "s3://lumina-sidecar/raw/", tmp_path / "out", captions="s3://lumina-sidecar/meta/alt.parquet"
    )
    manifest = pd.read_parquet(result.manifest).set_index("source_path")
    assert manifest.loc["s3://lumina-sidecar/raw/synthetic_00001.png", "caption"] == "from the sidecar"
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["sidecar"].startswith("s3://")
    with pytest.raises(
        ConfigError, match=r"caption sidecar s3://lumina-sidecar/meta/none\.csv cannot be fetched"
    ):
        ingest("s3://lumina-sidecar/raw/", tmp_path / "out2", captions="s3://lumina-sidecar/meta/none.csv")


def test_dvc_errors_name_dvcs_own_line_and_time_out(tmp_path):
    from data_tools.dvc_remote import dvc, error_line

    stderr = (
        "ERROR: failed to push data to the cloud - Unable to locate credentials\n"
        "Having any troubles? Hit us up at https://dvc.org/support, we are always happy to help!\n"
    )
    assert error_line(stderr) == "failed to push data to the cloud - Unable to locate credentials"
    assert error_line("something broke\nHaving any troubles? Hit us up at https://dvc.org/support\n") == (
        "something broke"
    )
    with pytest.raises(DvcError, match=r"dvc version timed out after 0.01 s \(remote unreachable"):
        dvc("version", cwd=tmp_path, timeout=0.01)
    with pytest.raises(DvcError, match="dvc status failed: you are not inside of a DVC repository") as info:
        dvc("status", cwd=tmp_path)
    assert "Having any troubles" not in str(info.value)
