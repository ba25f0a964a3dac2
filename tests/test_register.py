"""Registration and promotion: challenger always, champion only through the gate."""

import pytest
from mlflow import MlflowClient

from components.register.register import MetricRule, PromotionGate, download_version, register_model
from model.errors import ConfigError


def test_gate_thresholds_and_regressions():
    gate = PromotionGate(
        rules={"val_loss": MetricRule(better="lower", max=1.0), "acc": MetricRule(better="higher", min=0.5)}
    )
    assert gate.check({"val_loss": 0.5, "acc": 0.7}, None) == []
    assert gate.check({"val_loss": 1.5, "acc": 0.7}, None) == ["val_loss=1.5 > max 1"]
    assert "acc missing" in gate.check({"val_loss": 0.5}, None)
    assert gate.check({"val_loss": 0.5, "acc": 0.7}, {"val_loss": 0.4, "acc": 0.7})[0].startswith(
        "val_loss=0.5 regresses"
    )
    assert gate.check({"val_loss": 0.405, "acc": 0.7}, {"val_loss": 0.4, "acc": 0.7}) == []  # within 2 %
    assert "regresses" in gate.check({"val_loss": 0.5, "acc": 0.6}, {"val_loss": 0.5, "acc": 0.7})[0]


def test_register_promote_and_hold(tiny_folder, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    first = register_model(tiny_folder, "m", uri, {"val_loss": 0.8}, tags={"dataset_hash": "abc"})
    assert first.promoted and first.aliases == ["challenger", "champion"]
    version = client.get_model_version("m", first.version)
    assert version.tags["dataset_hash"] == "abc" and float(version.tags["metric.val_loss"]) == 0.8
    worse = register_model(tiny_folder, "m", uri, {"val_loss": 0.9})
    assert not worse.promoted and "regresses" in worse.reasons[0]
    failing = register_model(tiny_folder, "m", uri, {"val_loss": 5.0})
    assert "> max" in failing.reasons[0]
    assert str(client.get_model_version_by_alias("m", "champion").version) == first.version
    assert str(client.get_model_version_by_alias("m", "challenger").version) == failing.version
    better = register_model(tiny_folder, "m", uri, {"val_loss": 0.5})
    assert (
        better.promoted and str(client.get_model_version_by_alias("m", "champion").version) == better.version
    )
    folder = download_version("models:/m@champion", tmp_path / "dl", uri)
    assert (folder / "model_index.json").is_file()
    from model.sampler import LuminaSampler

    LuminaSampler.load(folder)  # loads with our sampler


def test_model_card_describes_the_version(tiny_folder, tmp_path):
    import mlflow

    from components.register.model_card import transformer_summary
    from model.checkpoint import load_pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    tags = {"profile": "tiny", "dataset_hash": "abc123", "run.hq": "r-hq"}
    first = register_model(tiny_folder, "card", uri, {"val_loss": 0.25}, tags=tags)
    held = register_model(tiny_folder, "card", uri, {"val_loss": 0.9}, tags=tags)
    card = client.get_model_version("card", first.version).description
    assert card.startswith(f"# card v{first.version}") and "| val_loss | 0.25 |" in card
    assert "ingest dataset hash: `abc123`" in card and "stage 3 run (HQ tuning): `r-hq`" in card
    assert "promoted to `champion`" in card and "random weights" in card  # the tiny profile says so
    held_card = client.get_model_version("card", held.version).description
    assert "not promoted: val_loss=0.9 regresses" in held_card
    params = sum(p.numel() for p in load_pipeline(tiny_folder).transformer.parameters())
    assert transformer_summary(tiny_folder)["parameters"] == params  # counted from headers, exactly
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert mlflow.artifacts.load_text(f"{run.info.artifact_uri}/model_card.md") == card


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="not a diffusers pipeline folder"):
        register_model(tmp_path, "m", f"sqlite:///{tmp_path / 'db'}", {"val_loss": 1.0})
    with pytest.raises(ConfigError, match="not a registry URI"):
        download_version("runs:/abc/model", tmp_path)


def test_registry_cli_lists_promotes_and_rolls_back(tiny_folder, tmp_path):
    import json
    import os
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    good = register_model(tiny_folder, "ops", uri, {"val_loss": 0.4})
    bad = register_model(tiny_folder, "ops", uri, {"val_loss": 3.0})  # over the default max: held
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "components.register", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    listed = json.loads(cli("versions", "ops", "--json").stdout)
    assert [v["version"] for v in listed] == [bad.version, good.version]
    assert listed[1]["aliases"] == ["champion"] and listed[0]["aliases"] == ["challenger"]
    assert "val_loss=3 > max 2" in listed[0]["promotion"]
    assert f"v{good.version}" in cli("versions", "ops").stdout  # the table

    refused = cli("promote", "ops", bad.version)
    assert refused.returncode == 2 and "not promoted to champion: val_loss=3 > max 2" in refused.stderr
    client = MlflowClient(tracking_uri=uri)
    assert str(client.get_model_version_by_alias("ops", "champion").version) == good.version  # unchanged

    forced = cli("promote", "ops", bad.version, "--force")
    assert forced.returncode == 0 and "forced past: val_loss=3 > max 2" in forced.stdout
    assert str(client.get_model_version_by_alias("ops", "champion").version) == bad.version
    back = cli("promote", "ops", good.version)  # the rollback passes the gate: better than the champion
    assert back.returncode == 0, back.stderr
    version = client.get_model_version("ops", good.version)
    assert (
        version.tags["promotion"].startswith("manual champion by")
        and f"replacing v{bad.version}" in version.tags["promotion"]
    )
    assert str(client.get_model_version_by_alias("ops", "champion").version) == good.version

    for args, message in (
        (("promote", "ops", "99"), "model 'ops' has no version '99'"),
        (("versions", "nope"), "no registered model 'nope'"),
    ):
        proc = cli(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    env.pop("MLFLOW_TRACKING_URI")
    assert "no MLflow tracking URI" in cli("versions", "ops").stderr
