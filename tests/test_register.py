"""Registration and promotion: challenger always, champion only through the gate."""

import pytest
from mlflow import MlflowClient

from common.errors import ConfigError
from components.register.register import MetricRule, PromotionGate, download_version, register_model


def test_gate_thresholds_and_regressions():
    gate = PromotionGate(
        rules={"val_loss": MetricRule(better="lower", max=1.0), "acc": MetricRule(better="higher", min=0.5)}
    )
    assert gate.check({"val_loss": 0.5, "acc": 0.7}, None) == []
    assert gate.check({"val_loss": 1.5, "acc": 0.7}, None) == ["val_loss=1.5 > max 1"]
    assert "acc missing from the evaluation" in gate.check({"val_loss": 0.5}, None)
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


def test_registry_cli_lists_promotes_and_rolls_back(tiny_folder, tmp_path, monkeypatch, cli):
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    good = register_model(tiny_folder, "ops", uri, {"val_loss": 0.4})
    bad = register_model(tiny_folder, "ops", uri, {"val_loss": 3.0})  # over the default max: held
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_registry_cli = cli

    def cli(*args: str):
        return run_registry_cli("components.register.__main__", *args)

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
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert "no MLflow tracking URI" in cli("versions", "ops").stderr


@pytest.mark.parametrize(
    ("value", "shown"), [(float("nan"), "NaN"), (float("inf"), "+inf"), (float("-inf"), "-inf")]
)
def test_gate_never_promotes_a_non_finite_metric(value, shown):
    lower = PromotionGate()  # val_loss ≤ 2, lower is better
    higher = PromotionGate(rules={"acc": MetricRule(better="higher", min=0.5)})
    unbounded = PromotionGate(rules={"val_loss": MetricRule(better="lower")})  # only the champion check
    for gate, name in ((lower, "val_loss"), (higher, "acc"), (unbounded, "val_loss")):
        for champion in (None, {name: 0.8}):
            assert gate.check({name: value}, champion) == [f"{name} is {shown} (not a finite number)"]


def test_gate_never_promotes_a_missing_metric():
    gate = PromotionGate(
        rules={"val_loss": MetricRule(better="lower", max=1.0), "acc": MetricRule(better="higher", min=0.5)}
    )
    assert gate.check({"val_loss": 0.5}, None) == ["acc missing from the evaluation"]
    assert gate.check({"val_loss": 0.5}, {"val_loss": 0.6, "acc": 0.7}) == ["acc missing from the evaluation"]


def test_gate_names_a_champion_metric_it_cannot_compare():
    gate = PromotionGate(
        rules={"val_loss": MetricRule(better="lower", max=1.0), "acc": MetricRule(better="higher", min=0.5)}
    )
    result = gate.evaluate({"val_loss": 0.5, "acc": 0.7}, {"val_loss": float("nan")})
    assert result.passed and result.reasons == []
    assert result.notes == [
        "champion's val_loss is NaN (not a finite number): not compared",
        "champion has no acc: not compared",
    ]
    assert result.deltas == []  # nothing finite on both sides
    bounded = gate.evaluate({"val_loss": 1.5, "acc": 0.7}, {"val_loss": float("inf"), "acc": 0.7})
    assert bounded.reasons == ["val_loss=1.5 > max 1"]  # the bounds still apply
    assert bounded.notes == ["champion's val_loss is +inf (not a finite number): not compared"]


def test_gate_reports_deltas_against_the_champion():
    gate = PromotionGate(
        rules={"val_loss": MetricRule(better="lower", max=1.0), "acc": MetricRule(better="higher", min=0.5)}
    )
    result = gate.evaluate({"val_loss": 0.6, "acc": 0.75, "extra": 3.0}, {"val_loss": 0.8, "acc": 0.7})
    assert result.passed
    assert [(d.metric, round(d.delta, 6), round(d.relative, 4)) for d in result.deltas] == [
        ("acc", 0.05, 7.1429),
        ("val_loss", -0.2, -25.0),
    ]
    assert result.summary() == "promoted; vs champion: acc +0.05 (+7.14%), val_loss -0.2 (-25.00%)"
    regressed = gate.check({"val_loss": 1.0, "acc": 0.7}, {"val_loss": 0.8, "acc": 0.7})
    assert regressed == ["val_loss=1 regresses against champion 0.8 +0.2 (+25.00%)"]
    zero = gate.evaluate({"val_loss": 0.1, "acc": 0.7}, {"val_loss": 0.0, "acc": 0.7})
    assert zero.deltas[1].relative is None and "val_loss +0.1 (n/a %)" in zero.summary()


def test_register_holds_non_finite_and_missing_metrics(tiny_folder, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    good = register_model(tiny_folder, "div", uri, {"val_loss": 0.8})
    for metrics, reason in (
        ({"val_loss": float("nan")}, "val_loss is NaN (not a finite number)"),
        ({"val_loss": float("inf")}, "val_loss is +inf (not a finite number)"),
        ({"val_loss": float("-inf")}, "val_loss is -inf (not a finite number)"),
        ({"clip_score": 30.0}, "val_loss missing from the evaluation"),
    ):
        held = register_model(tiny_folder, "div", uri, metrics)
        assert not held.promoted and held.aliases == ["challenger"] and held.reasons == [reason]
        version = client.get_model_version("div", held.version)
        assert version.tags["promotion"].startswith(reason)
        assert f"not promoted: {reason}" in version.description
        assert str(client.get_model_version_by_alias("div", "champion").version) == good.version


def test_nan_champion_does_not_block_and_deltas_are_recorded(tiny_folder, tmp_path):
    from components.register.registry import PromotionRefused, promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    first = register_model(tiny_folder, "nan", uri, {"val_loss": 0.8, "acc": 0.5})
    diverged = register_model(tiny_folder, "nan", uri, {"val_loss": float("nan"), "acc": 0.5})
    assert not diverged.promoted
    with pytest.raises(PromotionRefused, match=r"val_loss is NaN \(not a finite number\)") as refused:
        promote("nan", diverged.version, uri)  # the manual promotion goes through the same gate
    assert refused.value.reasons == ["val_loss is NaN (not a finite number)"]
    assert str(client.get_model_version_by_alias("nan", "champion").version) == first.version
    assert promote("nan", diverged.version, uri, force=True) == ["val_loss is NaN (not a finite number)"]
    note = client.get_model_version("nan", diverged.version).tags["promotion"]
    assert (
        f"replacing v{first.version}" in note and "forced past: val_loss is NaN (not a finite number)" in note
    )
    assert "vs champion: acc +0 (+0.00%)" in note

    fixed = register_model(tiny_folder, "nan", uri, {"val_loss": 0.6, "acc": 0.55})
    assert fixed.promoted and fixed.reasons == [] and fixed.champion == diverged.version
    assert fixed.notes == ["champion's val_loss is NaN (not a finite number): not compared"]
    assert [d.metric for d in fixed.deltas] == ["acc"]  # NaN on one side: no delta
    version = client.get_model_version("nan", fixed.version)
    assert "champion's val_loss is NaN (not a finite number): not compared" in version.tags["promotion"]
    assert "champion's val_loss is NaN" in version.description

    better = register_model(tiny_folder, "nan", uri, {"val_loss": 0.45, "acc": 0.6})
    assert better.promoted and better.champion == fixed.version
    card = client.get_model_version("nan", better.version).description
    assert f"Against the champion v{fixed.version}" in card
    assert f"| metric | this version | champion v{fixed.version} | Δ | Δ % |" in card
    assert "| val_loss | 0.45 | 0.6 | -0.15 | -25.00% |" in card
    assert "| acc | 0.6 | 0.55 | +0.05 | +9.09% |" in card
    promotion = client.get_model_version("nan", better.version).tags["promotion"]
    assert promotion == "promoted; vs champion: acc +0.05 (+9.09%), val_loss -0.15 (-25.00%)"
    assert "no current champion to compare with" in client.get_model_version("nan", first.version).description


def test_new_data_is_decided_by_the_source_fingerprint_of_registered_versions(s3, tmp_path, tiny_folder):
    """A loopback S3 source planned, registered, then grown: only the grown source is new data."""
    import io

    from PIL import Image

    from components.plan.plan import plan_source
    from components.register.component import new_data_op
    from storage import write_bytes

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for i in range(3):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 60, 10, 10)).save(buf, format="PNG")
        write_bytes(f"s3://lumina/raw/img{i}.png", buf.getvalue())

    def decide(only_new: bool = True):
        plan = plan_source("s3://lumina/raw/", str(tmp_path / "root"), group_size=2)
        return new_data_op.python_func(groups=plan.group_items, model_name="m", only_new_data=only_new,
                                       mlflow_tracking_uri=uri)  # fmt: skip

    first = decide()
    assert first.decision == "train" and len(first.fingerprint) == 16  # nothing registered yet
    register_model(tiny_folder, "m", uri, {"val_loss": 0.8}, tags={"source_fingerprint": first.fingerprint})
    again = decide()
    assert again.decision == "unchanged" and "m version 1 was trained on this source" in again.reason
    assert decide(only_new=False).decision == "train"  # a manual run trains anyway
    write_bytes("s3://lumina/raw/img9.png", buf.getvalue())  # new data arrives
    grown = decide()
    assert grown.decision == "train" and grown.fingerprint != first.fingerprint


def test_registry_keeps_files_beside_its_store_history_and_one_version_per_run(
    tiny_folder, tmp_path, monkeypatch, cli
):
    import json

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # MLflow's own default would put the files in ./mlruns here
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    (tmp_path / "out").mkdir()
    first = register_model(tiny_folder, "hist", uri, {"val_loss": 0.4}, tags={"pipeline_run": "run-a"})
    assert not any(work.iterdir())  # nothing in the working directory
    assert list((tmp_path / "out" / "mlartifacts").rglob("model_index.json"))  # beside the store

    retried = register_model(tiny_folder, "hist", uri, {"val_loss": 0.4}, tags={"pipeline_run": "run-a"})
    assert retried.version == first.version and retried.promoted  # a retry finds its version
    assert first.metrics == retried.metrics == {"val_loss": 0.4}  # the summary's numbers, both ways
    second = register_model(tiny_folder, "hist", uri, {"val_loss": 0.3}, tags={"pipeline_run": "run-b"})
    client = MlflowClient(tracking_uri=uri)
    assert len(client.search_model_versions("name = 'hist'")) == 2

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli("components.register.__main__", "promote", "hist", first.version, "--force").returncode == 0
    assert cli("components.register.__main__", "promote", "hist", second.version).returncode == 0
    old = client.get_model_version("hist", first.version)
    history = [entry["note"] for entry in json.loads(old.tags["promotion.history"])]
    assert history[0].startswith("registered: promoted") and history[1].startswith("manual champion by")
    assert (
        history[2] == f"champion moved to v{second.version} by " + history[1].split(" by ")[1].split(" ")[0]
    )
    card = client.get_model_version("hist", second.version).description
    assert card.startswith(f"# hist v{second.version}") and card.count("## Promotion history") == 1
    assert "Aliases now: challenger, champion" in card and "manual champion by" in card
    assert "Aliases now: none" in old.description


def test_the_raw_weights_of_an_export_are_not_registered(tiny_folder, tmp_path):
    """A stage export carries its raw transformer for the next stage; the registered (served)
    model is the EMA pipeline alone, so a serving pod never downloads the weights twice."""
    import shutil

    from model.checkpoint import RAW_TRANSFORMER_DIR

    export = shutil.copytree(tiny_folder, tmp_path / "export")
    shutil.copytree(tiny_folder / "transformer", export / RAW_TRANSFORMER_DIR)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    reg = register_model(export, "raw-check", uri, {"val_loss": 0.5})
    names = {
        a.path.split("/")[-1] for a in MlflowClient(tracking_uri=uri).list_artifacts(reg.run_id, "pipeline")
    }
    assert {"model_index.json", "transformer", "vae"} <= names and RAW_TRANSFORMER_DIR not in names
    served = download_version("models:/raw-check/1", tmp_path / "served", tracking_uri=uri)
    assert (served / "model_index.json").is_file() and not (served / RAW_TRANSFORMER_DIR).exists()
