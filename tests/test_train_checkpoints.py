"""Durable stage checkpoints: write then mark, resume from the newest complete one, retention,
checkpoints by wall-clock minutes (components/train/checkpoints.py and the trainer using it)."""

import json
import logging
import os
from pathlib import Path
from unittest import mock

import pytest

from components.train import checkpoints
from components.train.checkpoints import (
    EMA_FILE,
    MARKER,
    Checkpoint,
    CheckpointError,
    CheckpointSchedule,
    complete_checkpoints,
    mark_complete,
    problem,
    prune,
    resume_from,
    scan,
    tag_step,
)
from components.train.config import stage_config
from components.train.resume import read_losses
from components.train.trainer import train_stage
from tests.shapes import make_manifest


def fake_tag(ckpt_dir: Path, step: int, complete: bool = True) -> Path:
    tag_dir = ckpt_dir / f"step{step}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x" * (10 + step))
    (tag_dir / EMA_FILE).write_bytes(b"e" * 5)
    if complete:
        mark_complete(tag_dir, step)
    return tag_dir


def tags(ckpt_dir: Path) -> list[str]:
    return sorted((p.name for p in ckpt_dir.iterdir() if tag_step(p.name) is not None), key=tag_step)


# --- checkpoints.py -----------------------------------------------------------------------------


def test_marker_records_files_and_sizes_atomically(tmp_path):
    tag_dir = fake_tag(tmp_path, 7, complete=False)
    record = mark_complete(tag_dir, 7)
    assert json.loads((tag_dir / MARKER).read_text()) == record
    assert record["step"] == 7 and record["time"]
    assert record["files"] == {EMA_FILE: 5, "mp_rank_00_model_states.pt": 17}
    assert sorted(p.name for p in tag_dir.iterdir()) == [MARKER, EMA_FILE, "mp_rank_00_model_states.pt"]
    assert problem(tag_dir, 7) is None
    (tag_dir / EMA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not complete"):
        mark_complete(tag_dir, 7)


def test_problems_name_what_is_wrong(tmp_path):
    assert tag_step("step12") == 12 and tag_step("latest") is None and tag_step("step") is None
    missing_marker = fake_tag(tmp_path, 1, complete=False)
    assert "no COMPLETE marker" in problem(missing_marker, 1)
    missing_ema = fake_tag(tmp_path, 2)
    (missing_ema / EMA_FILE).unlink()
    assert problem(missing_ema, 2) == f"lacks {EMA_FILE}"
    truncated = fake_tag(tmp_path, 3)
    (truncated / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert "of 1 bytes, 13 when it was saved" in problem(truncated, 3)
    garbled = fake_tag(tmp_path, 4)
    (garbled / MARKER).write_text("{not json")
    assert "unreadable" in problem(garbled, 4)
    moved = fake_tag(tmp_path, 6).rename(tmp_path / "step9")  # its marker names another step
    assert problem(moved, 9) == "has a COMPLETE marker for step 6"


def test_scan_lists_newest_first_and_flags_incomplete(tmp_path):
    assert scan(tmp_path / "none") == []
    for step in (5, 10, 15):
        fake_tag(tmp_path, step, complete=step != 15)
    (tmp_path / "latest").write_text("step15")
    (tmp_path / "step20").write_text("a file, not a tag folder")
    found = scan(tmp_path)
    assert [c.tag for c in found] == ["step15", "step10", "step5"]
    assert [c.complete for c in found] == [False, True, True]
    assert [c.step for c in complete_checkpoints(tmp_path)] == [10, 5]


def test_prune_keeps_the_last_n_complete(tmp_path):
    for step in (2, 4, 6, 8):
        fake_tag(tmp_path, step)
    fake_tag(tmp_path, 1, complete=False)  # older incomplete: garbage
    fake_tag(tmp_path, 10, complete=False)  # newer incomplete: rewritten when the run gets there
    (tmp_path / "ema-2.pt").write_bytes(b"old layout")
    (tmp_path / "ema-8.pt").write_bytes(b"old layout")
    removed = prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["ema-2.pt", "step1", "step2", "step4"]
    assert tags(tmp_path) == ["step6", "step8", "step10"]
    assert (tmp_path / "ema-8.pt").is_file()
    assert prune(tmp_path, keep=2) == []
    assert [p.name for p in prune(tmp_path, keep=1)] == ["step6"]
    assert prune(tmp_path / "missing", keep=1) == []
    with pytest.raises(ValueError, match="at least 1"):
        prune(tmp_path, keep=0)


def test_resume_from_falls_back_to_the_previous_complete(tmp_path, caplog):
    for step in (5, 10):
        fake_tag(tmp_path, step)
    fake_tag(tmp_path, 15, complete=False)
    tried = []

    def load(ckpt: Checkpoint) -> str | None:
        tried.append(ckpt.tag)
        return "UnpicklingError: bad data" if ckpt.step == 10 else None

    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        chosen = resume_from(scan(tmp_path), load)
    assert chosen.tag == "step5" and tried == ["step10", "step5"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "step15 has no COMPLETE marker" in message and "step10 could not be loaded" in message
    assert "resuming from step5 (step 5)" in message


def test_resume_from_starts_over_or_refuses(tmp_path, caplog):
    assert resume_from([], lambda c: None) is None and not caplog.records
    fake_tag(tmp_path, 3, complete=False)
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert resume_from(scan(tmp_path), lambda c: None, where="run/checkpoints") is None
    assert "no complete checkpoint in run/checkpoints (step3 has no COMPLETE marker" in caplog.text
    assert "starting from step 0" in caplog.text
    fake_tag(tmp_path, 6)
    with pytest.raises(CheckpointError, match=r"step6 could not be loaded \(EOFError\).*Move x aside"):
        resume_from(scan(tmp_path), lambda c: "EOFError", where="x")


def test_schedule_by_steps_and_by_minutes(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(checkpoints, "monotonic", lambda: now[0])
    by_steps = CheckpointSchedule(every_steps=5, total_steps=12)
    assert [d for d in range(1, 13) if by_steps.due_by_steps(d)] == [5, 10, 12]
    now[0] += 10**6
    assert not by_steps.due_by_time()  # no minutes: steps only
    timed = CheckpointSchedule(every_steps=100, total_steps=12, minutes=1.5)
    now[0] += 89
    assert not timed.due_by_time()
    now[0] += 1
    assert timed.due_by_time()
    timed.saved()
    assert not timed.due_by_time()
    now[0] += 90
    assert timed.due_by_time()


# --- the trainer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("data"), n=8)


def short_stage(manifest: Path, out: Path, **overrides):
    values = {"steps": 6, "global_batch": 2, "micro_batch": 2, "checkpoint_every": 2, "track": False}
    return stage_config("lowres", manifest=manifest, output_dir=out, **{**values, **overrides})


@pytest.mark.slow
def test_incomplete_or_corrupt_newest_checkpoint_falls_back(tmp_path, manifest, caplog):
    out = tmp_path / "run"
    first = train_stage(short_stage(manifest, out))
    ckpt_dir = out / "checkpoints"
    # retention: the last two complete checkpoints; the export is left alone
    assert tags(ckpt_dir) == ["step4", "step6"] and (out / "pipeline" / "model_index.json").is_file()
    assert [c.step for c in complete_checkpoints(ckpt_dir)] == [6, 4]
    assert (ckpt_dir / "latest").read_text().strip() == "step6"

    # killed after DeepSpeed wrote step6 (and `latest`), before the EMA weights were
    (ckpt_dir / "step6" / EMA_FILE).unlink()
    with caplog.at_level(logging.WARNING):
        again = train_stage(short_stage(manifest, out))
    assert "step6 lacks ema.pt; resuming from step4 (step 4)" in caplog.text
    assert again.losses == pytest.approx(first.losses, rel=1e-6, abs=1e-7)
    assert read_losses(out) == again.losses and len(again.losses) == 6
    assert [c.step for c in complete_checkpoints(ckpt_dir)] == [6, 4]

    # a corrupt newest checkpoint (same sizes, garbage bytes) falls back too
    states = ckpt_dir / "step6" / "mp_rank_00_model_states.pt"
    states.write_bytes(b"\0" * states.stat().st_size)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = train_stage(short_stage(manifest, out))
    assert "step6 could not be loaded (" in caplog.text and "resuming from step4" in caplog.text
    assert third.losses == pytest.approx(first.losses, rel=1e-6, abs=1e-7)
    assert problem(ckpt_dir / "step6", 6) is None

    # nothing complete: start over, with a warning
    for c in scan(ckpt_dir):
        (c.path / MARKER).unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fourth = train_stage(short_stage(manifest, out, steps=2, keep_checkpoints=1))
    assert "no complete checkpoint in" in caplog.text and "starting from step 0" in caplog.text
    assert fourth.losses == pytest.approx(first.losses[:2], rel=1e-6, abs=1e-7)
    assert tags(ckpt_dir) == ["step2", "step4", "step6"]  # the newer incomplete ones stay
    assert [c.step for c in complete_checkpoints(ckpt_dir)] == [2]


@pytest.mark.slow
def test_checkpoint_minutes_saves_between_step_checkpoints(tmp_path, manifest, monkeypatch):
    clock = iter(range(0, 10**6, 61))  # every reading is 61 s after the one before
    monkeypatch.setattr(checkpoints, "monotonic", lambda: next(clock))
    out = tmp_path / "timed"
    cfg = short_stage(manifest, out, steps=3, checkpoint_every=100, checkpoint_minutes=1, keep_checkpoints=3)
    train_stage(cfg)
    assert tags(out / "checkpoints") == ["step1", "step2", "step3"]
    assert all(c.complete for c in scan(out / "checkpoints"))
    with pytest.raises(Exception, match="keep_checkpoints"):
        short_stage(manifest, out, keep_checkpoints=0)
    with pytest.raises(Exception, match="checkpoint_minutes"):
        short_stage(manifest, out, checkpoint_minutes=0)


def test_stage_work_dir_is_a_stable_key_on_the_work_root(tmp_path):
    from components.train.launch import stage_work_dir

    first = stage_work_dir(str(tmp_path), "run-1/../x y", "lowres")
    assert first == tmp_path / "run-1-..-x-y" / "lowres" and first.is_dir()
    assert stage_work_dir(str(tmp_path), "run-1/../x y", "lowres") == first  # the retry finds it
    assert tmp_path in first.parents  # no way out of the root
    temp = stage_work_dir("", "run-1", "hq")
    assert temp.is_dir() and tmp_path not in temp.parents and temp.name.startswith("train-hq-")
    temp.rmdir()


def test_a_temporary_stage_folder_is_removed_on_success_and_kept_on_failure(tmp_path, capsys):
    """Without a work root (the embedded default) each stage trains in a temporary folder that
    nothing resumes from: it is removed when the step succeeds (checkpoints of every run used to
    pile up in /tmp), kept and named when it fails. A work-root folder stays for a retry."""
    from components.train.launch import stage_work

    with stage_work("", "run-1", "lowres") as work:
        (work / "output").mkdir()
        (work / "output" / "checkpoint.bin").write_bytes(b"x" * 1024)
    assert not work.exists()
    with pytest.raises(RuntimeError, match="boom"), stage_work("", "run-1", "highres") as failed:
        raise RuntimeError("boom")
    assert failed.is_dir() and f"kept for inspection: {failed}" in capsys.readouterr().err
    failed.rmdir()
    with stage_work(str(tmp_path), "run-1", "hq") as kept:
        (kept / "losses.jsonl").write_text("{}\n")
    assert kept == tmp_path / "run-1" / "hq" and (kept / "losses.jsonl").is_file()


def test_the_train_step_never_inherits_a_rendezvous():
    """A caller that trained in-process leaves MASTER_PORT set (and bound); a stage started by the
    pipeline's train step must pick its own port instead of failing with EADDRINUSE."""
    import socket

    from components.train.launch import RENDEZVOUS_VARIABLES, launch_env
    from components.train.trainer import ensure_distributed_env

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {"MASTER_PORT": str(held.getsockname()[1]), "MASTER_ADDR": "127.0.0.1", "RANK": "0",
               "WORLD_SIZE": "1", "PATH": "/bin", "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}  # fmt: skip
        child = launch_env(env)
        assert not set(child) & set(RENDEZVOUS_VARIABLES)
        assert child["PATH"] == "/bin" and child["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"]
        with mock.patch.dict(os.environ, child, clear=True):  # restored whole afterwards
            assert ensure_distributed_env() is True  # the stage owns (and picks) its port
            assert os.environ["MASTER_PORT"] != env["MASTER_PORT"]


def test_a_configuration_error_is_not_run_again_by_a_retry(tmp_path, capsys):
    import subprocess
    import sys

    from components.train.launch import PERMANENT_FAILURE, StageConfigError, run_stage_process

    bad = [
        sys.executable,
        "-c",
        "import sys; print('error: unknown stage mid', file=sys.stderr); sys.exit(2)",
    ]
    with pytest.raises(StageConfigError, match="stage failed: unknown stage mid"):
        run_stage_process(bad, tmp_path, {})
    assert (tmp_path / PERMANENT_FAILURE).read_text().strip() == "unknown stage mid"
    assert "error: unknown stage mid" in capsys.readouterr().err  # passed through to the task's log
    ran = tmp_path / "ran"
    retry = [sys.executable, "-c", f"open({str(ran)!r}, 'w')"]
    with pytest.raises(StageConfigError, match="not retried: an earlier attempt failed: unknown stage mid"):
        run_stage_process(retry, tmp_path, {})
    assert not ran.exists()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(subprocess.CalledProcessError):  # a crash or a kill: the retry runs it again
        run_stage_process([sys.executable, "-c", "raise SystemExit(1)"], other, {})
    assert not (other / PERMANENT_FAILURE).exists()


def test_the_train_task_counts_gpus_without_torch_on_a_machine_without_a_driver(tmp_path, monkeypatch):
    import subprocess
    import sys

    import components.train.launch as launch

    code = (
        "import sys; import components.train.launch as launch; launch.GPU_DEVICE_FILES = ('/no/such/dev',); "
        "print(launch.local_gpu_count(), 'torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["0", "False"]  # no driver: torch is not imported
    driver = tmp_path / "nvidiactl"
    driver.touch()
    monkeypatch.setattr(launch, "GPU_DEVICE_FILES", (str(driver),))  # a driver: torch counts the devices
    import torch

    assert launch.local_gpu_count() == torch.cuda.device_count()
