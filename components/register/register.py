"""Register the final stage's diffusers folder in the MLflow model registry and promote it.

Alias ``challenger`` always moves to the new version. Alias ``champion`` moves only when the
version's metrics clear the configured thresholds and do not regress against the current
champion; otherwise the champion stays where it was (and nothing is promoted on any failure).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from components.register.model_card import model_card
from model.errors import ConfigError

log = logging.getLogger(__name__)
CHALLENGER, CHAMPION = "challenger", "champion"
ARTIFACT_DIR = "pipeline"
EXPERIMENT = "lumina-register"


class MetricRule(BaseModel):
    """A bound on one metric and which direction is better."""

    model_config = ConfigDict(extra="forbid")

    better: Literal["lower", "higher"]
    max: float | None = None
    min: float | None = None


class PromotionGate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: dict[str, MetricRule] = {"val_loss": MetricRule(better="lower", max=2.0)}
    regression_tolerance: float = Field(0.02, ge=0.0, description="relative slack against the champion")

    def check(self, metrics: dict[str, float], champion: dict[str, float] | None) -> list[str]:
        """Reasons not to promote (empty: promote)."""
        reasons = []
        for name, rule in self.rules.items():
            if name not in metrics:
                reasons.append(f"{name} missing")
                continue
            value = metrics[name]
            if rule.max is not None and value > rule.max:
                reasons.append(f"{name}={value:.4g} > max {rule.max:.4g}")
            if rule.min is not None and value < rule.min:
                reasons.append(f"{name}={value:.4g} < min {rule.min:.4g}")
            if champion and name in champion:
                best, slack = champion[name], abs(champion[name]) * self.regression_tolerance
                worse = value > best + slack if rule.better == "lower" else value < best - slack
                if worse:
                    reasons.append(f"{name}={value:.4g} regresses against champion {best:.4g}")
        return reasons


@dataclass
class Registration:
    name: str
    version: str
    aliases: list[str]
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    run_id: str = ""


def _metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {f"metric.{k}": repr(float(v)) for k, v in metrics.items()}


def tag_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The metrics a model version carries as ``metric.<name>`` tags."""
    return {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}


def champion_metrics(client, name: str) -> dict[str, float] | None:
    """The current champion's metrics; None when there is no champion."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return tag_metrics(version.tags)


def register_model(
    model_dir: str | Path,
    name: str,
    tracking_uri: str,
    metrics: dict[str, float],
    *,
    gate: PromotionGate | None = None,
    tags: dict[str, str] | None = None,
) -> Registration:
    """Log ``model_dir`` as run artifacts, create a model version, set aliases per the gate, and
    write its model card (the version's description and ``model_card.md`` in the run). No
    process-wide MLflow state is changed (:mod:`components.tracking`)."""
    from mlflow.exceptions import MlflowException

    from components.tracking import client_run

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ConfigError(f"{model_dir} is not a diffusers pipeline folder (no model_index.json)")
    gate = gate or PromotionGate()
    all_tags = {**(tags or {}), **_metric_tags(metrics)}
    with client_run(tracking_uri, EXPERIMENT, f"register-{name}", all_tags) as run:
        client = run.client
        for key, value in metrics.items():
            client.log_metric(run.run_id, key, float(value))
        client.log_artifacts(run.run_id, str(model_dir), artifact_path=ARTIFACT_DIR)
        try:
            client.get_registered_model(name)
        except MlflowException:  # not registered yet
            client.create_registered_model(name, description="Lumina-Image 2.0-style text-to-image pipeline")
        source = f"{run.artifact_uri}/{ARTIFACT_DIR}"
        version = client.create_model_version(name, source=source, run_id=run.run_id, tags=all_tags)
        reasons = gate.check(metrics, champion_metrics(client, name))
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        aliases = [CHALLENGER]
        if not reasons:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            aliases.append(CHAMPION)
        client.set_model_version_tag(name, version.version, "promotion", "; ".join(reasons) or "promoted")
        card = model_card(name, str(version.version), model_dir, metrics, all_tags, aliases, reasons)
        client.update_model_version(name, version.version, description=card)
        client.log_text(run.run_id, card, "model_card.md")
    log.info("registered %s v%s aliases=%s %s", name, version.version, aliases, reasons or "")
    return Registration(name, str(version.version), aliases, not reasons, reasons, run.run_id)


def download_version(uri: str, dest: str | Path, tracking_uri: str | None = None) -> Path:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → a local diffusers folder
    (the server's fetch: staged download into an empty or earlier-download ``dest``)."""
    from serving.fetch import fetch_mlflow

    if not uri.startswith("models:/"):
        raise ConfigError(f"not a registry URI: {uri!r} (expected models:/<name>@<alias>)")
    return fetch_mlflow(uri, Path(dest), tracking_uri)
