"""Stage training on the real DeepSpeed engine (CPU, gloo) with the tiny profile."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.errors import ConfigError, WeightsNotFoundError
from components.latents import LatentStore
from components.latents.cache import index_files
from components.train.checkpoints import complete_checkpoints
from components.train.config import load_config, stage_config
from components.train.data import bucket_sizes, decode_image, fingerprint, read_manifest
from components.train.loader import LOADER_STATE, StageFilter, stage_rows
from components.train.resume import read_losses
from components.train.sources import encode_manifest
from components.train.trainer import lr_factor, train_stage, velocity_model
from model.checkpoint import (
    RAW_TRANSFORMER_DIR,
    build_pipeline,
    load_for_training,
    load_pipeline,
    save_pipeline,
)
from model.flow import validation_loss
from model.text import encode_prompts
from model.vae import encode_images
from services.process import free_port


@pytest.fixture(scope="module")
def manifest(shapes_manifest) -> Path:
    return shapes_manifest


def shard_manifest(manifest: Path, out: Path) -> Path:
    """The same images and captions written into a tar shard, the manifest naming shard refs only
    (``image_path`` empty, as the tier step writes it) plus the images' width / height."""
    from storage.shards import ShardWriter

    frame = pd.read_parquet(manifest)
    writer = ShardWriter(str(out / "shards"), "train", max_members=10)
    refs = []
    for i, row in enumerate(frame.to_dict("records")):
        writer.add(f"{row['id']}.png", (manifest.parent / row["image_path"]).read_bytes())
        if writer.full or i == len(frame) - 1:
            refs += writer.flush()
    sizes = [Image.open(manifest.parent / p).size for p in frame["image_path"]]
    frame = frame.assign(
        image_path=None,
        width=[w for w, _ in sizes],
        height=[h for _, h in sizes],
        **{k: [ref.as_row()[k] for ref in refs] for k in ("shard", "member", "offset", "size")},
    )
    path = out / "sharded.parquet"
    frame.to_parquet(path)
    return path


def encoded(manifest: Path, cache_dir: Path, pipe, resolution: int = 128) -> tuple[LatentStore, dict]:
    """The manifest encoded as training encodes it: a latent store and each id's bucket."""
    flt = StageFilter(resolution, fingerprint(pipe.vae))
    files = index_files(encode_manifest(manifest, None, pipe.vae, flt, cache_dir))
    rows = pd.concat([stage_rows(f, flt) for f in files])
    return LatentStore(rows), {r.id: (r.height, r.width) for r in rows.itertuples()}


def heldout(pipe, manifest: Path) -> float:
    records = read_manifest(manifest)[:12]
    images = [decode_image(r).resize((64, 64)) for r in records]
    latents = encode_images(pipe.vae, images)
    emb = encode_prompts([r.captions[0].text for r in records], pipe.tokenizer, pipe.text_encoder)

    def velocity(x, t, c, m):
        return pipe.transformer(x, t, c, m).sample

    return validation_loss(velocity, latents, emb.embeds, emb.mask, seed=1)


def test_buckets_are_patch_aligned_within_budget():
    for res in (64, 128, 256, 1024):
        for h, w in bucket_sizes(res):
            assert h % 64 == 0 and w % 64 == 0 and h * w <= res * res
    assert (64, 64) in bucket_sizes(64) and (1024, 1024) in bucket_sizes(1024)


def test_lr_schedule_warms_up_then_holds_or_anneals(tmp_path, manifest):
    def factors(**kw):
        cfg = stage_config("lowres", manifest=manifest, output_dir=tmp_path, steps=10, **kw)
        return [lr_factor(cfg, step) for step in range(10)]

    assert factors() == [1.0] * 10  # the default: constant, as the official trainer
    assert factors(warmup_steps=4) == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)
    cosine = factors(lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert cosine[:3] == pytest.approx([0.5, 1.0, 1.0]) and cosine[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(cosine[2:]))  # annealing every step
    assert factors(warmup_steps=50)[-1] == pytest.approx(1.0)  # a warmup longer than the stage: capped
    # warmup-stable-decay: flat, then a straight line over the last 40 % down to the floor
    wsd = factors(lr_schedule="wsd", decay_fraction=0.4, min_lr_ratio=0.2, warmup_steps=1)
    assert wsd == pytest.approx([1.0] * 6 + [0.8, 0.6, 0.4, 0.2])
    assert factors(lr_schedule="wsd", decay_fraction=1.0, warmup_steps=4)[:5] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 5 / 6]  # the decay starts after the warmup (6 steps left)
    )
    with pytest.raises(ConfigError, match="lr_schedule"):
        stage_config("lowres", manifest=manifest, output_dir=tmp_path, lr_schedule="step")


def test_bad_configs_are_clear_errors(tmp_path, manifest):
    with pytest.raises(ConfigError, match="unknown stage 'mid'"):
        stage_config("mid", manifest=manifest, output_dir=tmp_path)
    with pytest.raises(ConfigError, match="training config: invalid lr"):
        stage_config("lowres", manifest=manifest, output_dir=tmp_path, lr=-1)
    with pytest.raises(ConfigError, match="invalid time_shift"):
        stage_config("lowres", manifest=manifest, output_dir=tmp_path, time_shift=0)
    with pytest.raises(ConfigError, match="invalid decay_fraction"):
        stage_config("lowres", manifest=manifest, output_dir=tmp_path, lr_schedule="wsd", decay_fraction=0)
    with pytest.raises(ConfigError, match=r"invalid val_resolution.*multiple of 16"):  # before training
        stage_config("lowres", manifest=manifest, output_dir=tmp_path, val_resolution=100)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not divisible"):
        stage_config(
            "lowres", manifest=manifest, output_dir=tmp_path, global_batch=10, micro_batch=4
        ).gradient_accumulation(1)
    broken = tmp_path / "broken.parquet"
    pd.DataFrame({"id": ["a"]}).to_parquet(broken)
    with pytest.raises(ConfigError, match="lacks columns: image_path, domain, captions"):
        read_manifest(broken)
    with pytest.raises(ConfigError, match="training manifest not found"):
        read_manifest(tmp_path / "none.parquet")


def test_manifest_of_shard_refs_builds_the_same_cache_as_files(tmp_path, manifest, tiny_pipe):
    sharded = shard_manifest(manifest, tmp_path)
    by_file, by_ref = read_manifest(manifest), read_manifest(sharded)
    assert all(r.ref is None and r.image_path.is_file() for r in by_file)
    assert all(r.image_path is None and r.ref.shard.endswith(".tar") and r.width for r in by_ref)
    assert len({r.ref.shard for r in by_ref}) == 3  # 24 images, 10 per shard
    (a, size_a), (b, size_b) = (
        encoded(m, tmp_path / f"cache{i}", tiny_pipe) for i, m in enumerate((manifest, sharded))
    )
    assert size_a == size_b and len(set(size_a.values())) == 2  # 96x64 and 64x64 images
    assert set(a) == set(b) == {r.id for r in by_file}
    assert all(torch.equal(a[i], b[i]) for i in a)


def test_manifest_checks_refs_and_keeps_file_rows(tmp_path, manifest):
    sharded = pd.read_parquet(shard_manifest(manifest, tmp_path))
    mixed = sharded.copy()
    mixed.loc[0, ["shard", "member"]] = None
    mixed.loc[0, "image_path"] = str(manifest.parent / "img000.png")
    mixed.to_parquet(tmp_path / "mixed.parquet")
    records = read_manifest(tmp_path / "mixed.parquet")
    assert records[0].ref is None and records[0].image_path.is_file() and records[1].ref is not None
    sharded.drop(columns=["offset", "size"]).to_parquet(tmp_path / "no_offsets.parquet")
    with pytest.raises(ConfigError, match="lacks columns: offset, size"):
        read_manifest(tmp_path / "no_offsets.parquet")
    neither = sharded.copy()
    neither.loc[3, ["shard"]] = None
    neither.to_parquet(tmp_path / "neither.parquet")
    with pytest.raises(ConfigError, match="image s003 has neither a shard nor an image_path"):
        read_manifest(tmp_path / "neither.parquet")


@pytest.mark.slow
def test_a_stage_trains_identically_from_shards_and_files(tmp_path, manifest):
    sharded = shard_manifest(manifest, tmp_path)
    losses = []
    for name, path in (("files", manifest), ("shards", sharded)):
        cfg = stage_config("lowres", manifest=path, output_dir=tmp_path / name / "run", steps=3,
                           global_batch=4, micro_batch=2, track=False)  # fmt: skip
        losses.append(train_stage(cfg).losses)
    assert len(losses[0]) == 3 and losses[0] == losses[1]


@pytest.mark.slow
def test_online_caption_features_train_like_the_cache(tmp_path, manifest):
    """text_features: online (the paper's scale: no per-variant feature store) gives the losses of
    the start-of-stage cache (same Gemma features for the valid tokens; only padding differs)."""
    losses = {}
    for mode in ("cache", "online"):
        cfg = stage_config("lowres", manifest=manifest, output_dir=tmp_path / mode / "run", steps=3,
                           global_batch=4, micro_batch=2, track=False, text_features=mode)  # fmt: skip
        losses[mode] = train_stage(cfg).losses
    assert not list((tmp_path / "online" / "cache").glob("text-*.pt"))  # no feature store written
    assert list((tmp_path / "cache" / "cache").glob("text-*.pt"))
    assert losses["online"] == pytest.approx(losses["cache"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_tiny_stage_learns_and_exports_a_pipeline(tmp_path, trained_tiny):
    manifest, result = trained_tiny.manifest, trained_tiny.result
    before = heldout(build_pipeline("tiny", seed=trained_tiny.init_seed), manifest)
    trained = load_pipeline(result.pipeline_dir)
    after = heldout(trained, manifest)
    # Measured here: 1.03 at init -> 0.14 after 120 steps (EMA weights); require a clear margin.
    assert after < 0.5 * before, (before, after)
    assert len(result.losses) == 120
    assert (trained_tiny.output_dir / "checkpoints" / "latest").is_file()
    # the export carries the raw (non-EMA) weights too: the next stage starts from those
    raw = result.pipeline_dir / RAW_TRANSFORMER_DIR
    chained = load_for_training(result.pipeline_dir).transformer.state_dict()
    ema = trained.transformer.state_dict()
    assert (raw / "config.json").is_file() and chained.keys() == ema.keys()
    assert any(not torch.equal(chained[k], ema[k]) for k in ema), "the raw weights are the EMA ones"
    # the next stage starts from this export, at a higher resolution, with the aux loss
    hi = stage_config(
        "highres",
        manifest=manifest,
        output_dir=tmp_path / "highres",
        init_from=result.pipeline_dir,
        steps=4,
        global_batch=4,
        micro_batch=2,
    )
    hi_result = train_stage(hi)
    assert (hi_result.pipeline_dir / "model_index.json").is_file()


def test_cpu_training_does_not_build_the_shared_memory_inference_op(monkeypatch):
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from components.train.trainer import skip_shared_memory_inference_op

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)
    skip_shared_memory_inference_op()
    assert build_shm_op() is None  # nothing compiled or loaded (training never uses the op)


def test_the_timestep_reaches_the_model_in_fp32():
    """Latents and captions go in at the training dtype; t stays fp32 (bf16 would quantise it)."""
    seen = {}

    class Engine:
        def __call__(self, x, t, c, m):
            seen.update(x=x.dtype, t=t.dtype, c=c.dtype)
            return type("Out", (), {"sample": x})()

    velocity = velocity_model(Engine(), torch.bfloat16)
    t = torch.tensor([0.1234567, 0.5])
    out = velocity(torch.zeros(2, 16, 4, 4), t, torch.zeros(2, 3, 8), torch.ones(2, 3))
    assert seen == {"x": torch.bfloat16, "t": torch.float32, "c": torch.bfloat16}
    assert out.dtype == torch.float32
    assert t.to(torch.bfloat16).float()[0] != t[0]  # what the old cast did to t


def test_a_stage_starts_from_the_raw_weights_of_an_export(tmp_path):
    folder = save_pipeline(build_pipeline("tiny", seed=0), tmp_path / "export")
    build_pipeline("tiny", seed=1).transformer.save_pretrained(folder / RAW_TRANSFORMER_DIR)
    raw = build_pipeline("tiny", seed=1).transformer.state_dict()

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in b)

    assert same(load_for_training(folder).transformer.state_dict(), raw)
    assert not same(load_pipeline(folder).transformer.state_dict(), raw)  # the EMA one, for serving
    (folder / RAW_TRANSFORMER_DIR / "config.json").write_text("{not json")
    with pytest.raises(WeightsNotFoundError, match="raw transformer"):
        load_for_training(folder)
    plain = save_pipeline(build_pipeline("tiny", seed=2), tmp_path / "released")  # no raw folder
    assert same(
        load_for_training(plain).transformer.state_dict(),
        build_pipeline("tiny", seed=2).transformer.state_dict(),
    )


def _train_cli(manifest: Path, out: Path, config: Path) -> subprocess.Popen:
    env = {**os.environ, "MASTER_PORT": str(free_port())}  # a fresh port: a killed run's may linger
    cmd = [
        sys.executable,
        "-m",
        "components.train",
        "--manifest",
        str(manifest),
        "--output-dir",
        str(out),
        "--config",
        str(config),
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(tmp_path, manifest):
    config = tmp_path / "stage.yaml"
    config.write_text(
        "stage: lowres\nprofile: tiny\nsteps: 24\nglobal_batch: 4\nmicro_batch: 2\ncheckpoint_every: 5\n"
        "loader_unit: 8\nloader_workers: 2\n"
        # the LR schedule's position must come back from the checkpoint too, or the losses differ
        "lr_schedule: cosine\nwarmup_steps: 3\nmin_lr_ratio: 0.1\n"
    )
    straight = _train_cli(manifest, tmp_path / "straight", config)
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    killed = _train_cli(manifest, tmp_path / "resumed", config)
    losses_file = tmp_path / "resumed" / "losses.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        if losses_file.is_file() and len(losses_file.read_text().splitlines()) >= 10:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert killed.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(read_losses(tmp_path / "resumed")) < 24
    # the kill may land mid-save: what resume reads is the newest *complete* checkpoint's position
    newest = complete_checkpoints(tmp_path / "resumed" / "checkpoints")[0]  # newest first
    saved = json.loads((newest.path / LOADER_STATE).read_text())
    assert saved["positions"][0] != {"epoch": 0, "cursor": 0, "batch": 0}  # killed mid-stream

    resumed = _train_cli(manifest, tmp_path / "resumed", config)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = read_losses(tmp_path / "straight"), read_losses(tmp_path / "resumed")
    assert len(a) == len(b) == 24
    from mlflow.tracking import MlflowClient  # the resumed stage continued its own MLflow run

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((tmp_path / "resumed" / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["resumed_at_step"]) in (5, 10)
    assert len(client.search_runs([run.info.experiment_id])) == 2  # straight + resumed, no third
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["mlflow_run_id"] == run_id
    assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    sa = load_pipeline(tmp_path / "straight" / "pipeline").transformer.state_dict()
    sb = load_pipeline(tmp_path / "resumed" / "pipeline").transformer.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


@pytest.mark.slow
def test_stage_logs_to_a_real_mlflow_server(tmp_path, manifest):
    from mlflow.tracking import MlflowClient

    from services.mlflow_server import mlflow_server

    with mlflow_server(tmp_path / "mlflow") as uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            cfg = stage_config(
                "lowres",
                manifest=manifest,
                output_dir=tmp_path / "run",
                steps=6,
                global_batch=4,
                micro_batch=2,
                log_every=2,
                sample_every=3,
                lr_schedule="cosine",
                warmup_steps=2,
            )
            train_stage(cfg)
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("lumina-train").experiment_id])
        assert run.data.params["lr"] == str(cfg.lr) and run.data.tags["stage"] == "lowres"
        assert len(run.data.tags["dataset_sha256"]) == 64
        history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in history] == [2, 4, 6]
        assert {"aux_loss", "grad_norm", "lr", "images_per_s", "tokens_per_s"} <= set(run.data.metrics)
        lrs = [m.value for m in client.get_metric_history(run.info.run_id, "lr")]
        assert lrs == pytest.approx([cfg.lr * lr_factor(cfg, done - 1) for done in (2, 4, 6)])
        assert lrs[0] == pytest.approx(cfg.lr) and lrs[1] > lrs[2]  # warmed up (step 2 of 2), annealing
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.json", "loss_curve.png", "samples.png", "losses.jsonl", "samples"} <= names
        assert run.info.status == "FINISHED"


def test_a_stage_run_left_open_by_a_crash_ends_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "from components.tracking import MlflowTracker\n"
        f"t = MlflowTracker({uri!r}, 'crash')\n"
        "t.log_metrics({'loss': 1.0}, step=1)\n"
        "raise RuntimeError('the stage crashed')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "the stage crashed" in proc.stderr
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("lumina-train").experiment_id])
    assert run.info.status == "FAILED" and run.data.metrics["loss"] == 1.0


TORCHRUN_STEPS = 8


def _torchrun_cmd(
    tmp_path: Path, manifest: Path, name: str, zero_stage: int, nodes: str, extra: str = ""
) -> list[str]:
    """``torchrun`` of a tiny stage; ``nodes``: its node options (one node x 2, or a node of two)."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"steps: {TORCHRUN_STEPS}\nglobal_batch: 4\nmicro_batch: 1\nzero_stage: {zero_stage}\n"
        f"checkpoint_every: 2\ntrack: false\nloader_unit: 8\n{extra}"
    )
    return [sys.executable, "-m", "torch.distributed.run", *nodes.split(), "-m", "components.train",
            "--manifest", str(manifest), "--output-dir", str(tmp_path / name),
            "--config", str(config)]  # fmt: skip


def _clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }


def _torchrun(tmp_path: Path, manifest: Path, name: str, zero_stage: int) -> Path:
    nodes = f"--nproc_per_node 2 --master_port {free_port()}"
    cmd = _torchrun_cmd(tmp_path, manifest, name, zero_stage, nodes)
    proc = subprocess.run(cmd, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / name


@pytest.fixture(scope="module")
def one_node_two_processes(tmp_path_factory, manifest) -> Path:
    """A ZeRO-2 stage on one node with two processes (the reference of the multi-node test)."""
    return _torchrun(tmp_path_factory.mktemp("torchrun"), manifest, "zero2", 2)


@pytest.mark.slow
def test_two_processes_with_torchrun_zero2_and_zero3_agree(tmp_path, manifest, one_node_two_processes):
    zero2 = one_node_two_processes
    assert len(read_losses(zero2)) == TORCHRUN_STEPS
    assert (zero2 / "pipeline" / "model_index.json").is_file()
    states = list((zero2 / "checkpoints" / f"step{TORCHRUN_STEPS}").glob("*optim_states.pt"))
    assert len(states) == 2  # ZeRO-2 partitions optimizer state across the two ranks
    zero3 = _torchrun(tmp_path, manifest, "zero3", 3)
    params = list((zero3 / "checkpoints" / f"step{TORCHRUN_STEPS}").glob("*model_states.pt"))
    assert len(params) == 2  # ZeRO-3 partitions the parameters too
    # same data, same maths: the sharding strategy must not change what is learned
    assert np.allclose(read_losses(zero2), read_losses(zero3), rtol=1e-4, atol=1e-5)
    w2 = load_pipeline(zero2 / "pipeline").transformer.state_dict()
    w3 = load_pipeline(zero3 / "pipeline").transformer.state_dict()
    assert all(torch.allclose(w2[k], w3[k], atol=1e-5) for k in w2)


def _two_nodes(tmp_path: Path, manifest: Path) -> list[subprocess.Popen]:
    """Two torchrun "nodes" of one process each on loopback (static rendezvous, shared output)."""
    port = free_port()
    procs = []
    for node in (0, 1):
        nodes = (
            f"--nnodes 2 --node_rank {node} --nproc_per_node 1 --master_addr 127.0.0.1 --master_port {port}"
        )
        cmd = _torchrun_cmd(tmp_path, manifest, "nodes", 2, nodes)
        procs.append(subprocess.Popen(cmd, env=_clean_env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))  # fmt: skip
    return procs


@pytest.mark.slow
def test_two_nodes_match_one_node_and_resume_after_a_lost_rank(tmp_path, manifest, one_node_two_processes):
    first = _two_nodes(tmp_path, manifest)
    marker = tmp_path / "nodes" / "checkpoints" / "step2" / "COMPLETE"
    deadline = time.time() + 300
    while time.time() < deadline and not marker.is_file() and all(p.poll() is None for p in first):
        time.sleep(0.02)
    assert marker.is_file(), first[0].stderr.read()[-3000:]
    os.killpg(first[1].pid, signal.SIGKILL)  # node 1 is lost, its rank with it
    assert first[1].wait(timeout=60) != 0
    # Trainer's JobSet fails or restarts the whole job when one of its pods fails: node 0 goes too
    os.killpg(first[0].pid, signal.SIGKILL)
    first[0].wait(timeout=60)
    assert len(read_losses(tmp_path / "nodes")) < TORCHRUN_STEPS

    again = _two_nodes(tmp_path, manifest)  # the job's restart: resumes from the last complete checkpoint
    for proc in again:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    # 2 nodes x 1 process and 1 node x 2 processes are the same two ranks: the same samples, noise and
    # gradients. Tolerance: gloo's all-reduce of two float32 operands, rtol 1e-5.
    want, got = read_losses(one_node_two_processes), read_losses(tmp_path / "nodes")
    assert len(got) == TORCHRUN_STEPS and np.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_kfp_component_compiles(tmp_path):
    from kfp import compiler, dsl

    from components.train.component import train_stage_op

    @dsl.pipeline(name="train-stages")
    def stages(manifest_uri: str = "s3://bucket/tier.parquet"):
        data = dsl.importer(artifact_uri=manifest_uri, artifact_class=dsl.Dataset)
        low = train_stage_op(manifest=data.output, stage="lowres")
        train_stage_op(manifest=data.output, stage="highres", init_from=low.outputs["pipeline"])

    out = tmp_path / "train.yaml"
    compiler.Compiler().compile(stages, str(out))
    text = out.read_text()
    assert "train-stage-op" in text and "lumina-pipeline:0.1.0" in text and "init_from" in text


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_losses(tmp_path, manifest):
    runs = {}
    for ckpt in (False, True):
        out = tmp_path / f"gc{ckpt}"
        cfg = stage_config("lowres", manifest=manifest, output_dir=out, steps=4, global_batch=4,
                           micro_batch=2, track=False, gradient_checkpointing=ckpt)  # fmt: skip
        runs[ckpt] = train_stage(cfg).losses
    assert len(runs[True]) == 4
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_a_stage_run_continues_or_links_its_earlier_run(tmp_path, manifest, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    from components.train.tracking import stage_tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = stage_config("lowres", manifest=manifest, output_dir=tmp_path / "run")
    cfg.output_dir.mkdir()
    first, continued = stage_tracker(cfg, start=0)  # a fresh stage: a new run, its id kept
    assert not continued
    again, continued = stage_tracker(cfg, start=5)  # killed after a checkpoint: the same run
    assert continued and again.run_id == first.run_id
    client = first.client
    assert client.get_run(first.run_id).data.tags["resumed_at_step"] == "5"
    over, continued = stage_tracker(cfg, start=0)  # killed before any checkpoint: starts over
    assert not continued and over.run_id != first.run_id
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert client.get_run(over.run_id).data.tags["previous_run"] == first.run_id
    other = MlflowClient(f"sqlite:///{tmp_path / 'other.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    with caplog.at_level("WARNING"):
        fresh, continued = stage_tracker(cfg, start=5)  # the earlier run is in another store
    assert not continued and "cannot continue MLflow run" in caplog.text
    assert other.get_run(fresh.run_id).data.tags["previous_run"] == over.run_id
    for tracker in (first, over, fresh):
        tracker.finish()


@pytest.mark.slow
def test_unified_stage_trains_on_a_grids_manifest_with_template_c(tmp_path, trained_tiny):
    """``--stage unified`` on a grids.parquet (the CLI path, no pipeline index): the grid rows'
    latents are encoded at their grid bucket, every caption variant trained is Template C with the
    row's fill-ins, and the stage starts from the previous stage's export."""
    from components.grids.grid import build_grids, grid_caption_texts

    rows = pd.read_parquet(trained_tiny.manifest).head(4)
    rows["image_path"] = [str(trained_tiny.manifest.parent / p) for p in rows["image_path"]]
    config = {
        "kinds": {"canny": 1, "sketch": 1},
        "layouts": {"upper-lower": 1, "left-right": 1},
        "resolution": 128,
    }
    grids = build_grids(rows, tmp_path / "grids", config)
    manifest, init = tmp_path / "grids" / "grids.parquet", trained_tiny.result.pipeline_dir
    cfg = stage_config("unified", manifest=manifest, output_dir=tmp_path / "unified", init_from=init,
                       steps=2, global_batch=2, micro_batch=2)  # fmt: skip
    result = train_stage(cfg)
    assert (result.pipeline_dir / "model_index.json").is_file() and len(result.losses) == 2
    (cache,) = (tmp_path / "cache").glob("text-*.pt")
    trained_texts = set(torch.load(cache)) - {""}
    assert trained_texts == {t for g in grids for t in grid_caption_texts(g)}
    assert all(t.startswith(("Generate a dual-panel", "生成一幅双联")) for t in trained_texts)
