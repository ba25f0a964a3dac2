"""Register the final stage's diffusers folder in the MLflow model registry and promote it.

Alias ``challenger`` always moves to the new version. Alias ``champion`` moves only when the
version's metrics clear the configured thresholds and do not regress against the current
champion; otherwise the champion stays where it was (and nothing is promoted on any failure).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.errors import ConfigError
from components.register.model_card import model_card
from model.checkpoint import RAW_TRANSFORMER_DIR

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


def _non_finite(value: object) -> str:
    """Why ``value`` cannot be compared ("" when it is a finite number)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"is {value!r} (not a number)"
    if math.isnan(number):
        return "is NaN (not a finite number)"
    if math.isinf(number):
        return f"is {'+' if number > 0 else '-'}inf (not a finite number)"
    return ""


@dataclass(frozen=True)
class MetricDelta:
    """The challenger against the champion on one metric: ``delta`` = challenger − champion,
    ``relative`` = delta / |champion| in percent (None when the champion's value is 0)."""

    metric: str
    challenger: float
    champion: float
    delta: float
    relative: float | None

    @classmethod
    def of(cls, metric: str, challenger: float, champion: float) -> MetricDelta:
        delta = challenger - champion
        relative = delta / abs(champion) * 100.0 if champion else None
        return cls(metric, challenger, champion, delta, relative)

    def describe(self) -> str:
        relative = f"{self.relative:+.2f}%" if self.relative is not None else "n/a %"
        return f"{self.metric} {self.delta:+.4g} ({relative})"


@dataclass
class GateResult:
    """What the gate decided: ``reasons`` block the promotion; ``notes`` (the champion's metrics it
    could not compare against) do not; ``deltas`` compare the challenger with the champion on every
    metric both have as finite numbers."""

    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deltas: list[MetricDelta] = field(default_factory=list)
    has_champion: bool = False

    @property
    def passed(self) -> bool:
        return not self.reasons

    def comparison(self) -> str:
        """The deltas as one line ("" when there is nothing to compare)."""
        if not self.deltas:
            return ""
        return "vs champion: " + ", ".join(d.describe() for d in self.deltas)

    def summary(self) -> str:
        """The outcome, the reasons, the notes and the deltas as one line (the ``promotion`` tag)."""
        parts = list(self.reasons) or ["promoted"]
        parts += self.notes
        if self.comparison():
            parts.append(self.comparison())
        return "; ".join(parts)


class PromotionGate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: dict[str, MetricRule] = {"val_loss": MetricRule(better="lower", max=2.0)}
    regression_tolerance: float = Field(0.02, ge=0.0, description="relative slack against the champion")

    def check(self, metrics: dict[str, float], champion: dict[str, float] | None) -> list[str]:
        """Reasons not to promote (empty: promote)."""
        return self.evaluate(metrics, champion).reasons

    def evaluate(self, metrics: dict[str, float], champion: dict[str, float] | None) -> GateResult:
        """Check ``metrics`` against the bounds and the current ``champion``'s metrics (None: no
        champion). A rule's metric that is missing or not a finite number (NaN, ±inf: a diverged
        run) never promotes. A champion metric that is missing or not finite is named in the notes
        and not compared against (the bounds still apply)."""
        result = GateResult(has_champion=champion is not None)
        champion = champion or {}
        for name, rule in self.rules.items():
            if name not in metrics:
                result.reasons.append(f"{name} missing from the evaluation")
                continue
            if problem := _non_finite(metrics[name]):
                result.reasons.append(f"{name} {problem}")
                continue
            value = float(metrics[name])
            if rule.max is not None and not value <= rule.max:
                result.reasons.append(f"{name}={value:.4g} > max {rule.max:.4g}")
            if rule.min is not None and not value >= rule.min:
                result.reasons.append(f"{name}={value:.4g} < min {rule.min:.4g}")
            if not result.has_champion:
                continue
            if name not in champion:
                result.notes.append(f"champion has no {name}: not compared")
                continue
            if problem := _non_finite(champion[name]):
                result.notes.append(f"champion's {name} {problem}: not compared")
                continue
            best = float(champion[name])
            slack = abs(best) * self.regression_tolerance
            worse = value > best + slack if rule.better == "lower" else value < best - slack
            if worse:
                delta = MetricDelta.of(name, value, best).describe().removeprefix(f"{name} ")
                result.reasons.append(f"{name}={value:.4g} regresses against champion {best:.4g} {delta}")
        for name in sorted(set(metrics) & set(champion)):
            if not _non_finite(metrics[name]) and not _non_finite(champion[name]):
                result.deltas.append(MetricDelta.of(name, float(metrics[name]), float(champion[name])))
        return result


@dataclass
class Registration:
    name: str
    version: str
    aliases: list[str]
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    run_id: str = ""
    notes: list[str] = field(default_factory=list)  # what the gate could not compare (not blocking)
    deltas: list[MetricDelta] = field(default_factory=list)  # against the champion it was checked with
    champion: str = ""  # that champion's version ("" when there was none)
    metrics: dict[str, float] = field(default_factory=dict)  # the challenger's evaluation metrics


def _metric_tags(metrics: dict[str, float]) -> dict[str, str]:
    return {f"metric.{k}": repr(float(v)) for k, v in metrics.items()}


def _tag_float(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # a hand-edited tag: not a number, so the gate names it and never compares it
        return math.nan


def tag_metrics(tags: dict[str, str]) -> dict[str, float]:
    """The metrics a model version carries as ``metric.<name>`` tags (``nan``/``inf`` included)."""
    return {k.removeprefix("metric."): _tag_float(v) for k, v in tags.items() if k.startswith("metric.")}


def current_champion(client, name: str) -> tuple[str, dict[str, float]] | None:
    """The current champion's version and metrics; None when there is no champion."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(version.version), tag_metrics(version.tags)


def champion_metrics(client, name: str) -> dict[str, float] | None:
    """The current champion's metrics; None when there is no champion."""
    champion = current_champion(client, name)
    return champion[1] if champion else None


SOURCE_TAG = "source_fingerprint"
PIPELINE_RUN_TAG = "pipeline_run"


def newest_tagged(client, name: str, tag: str, value: str):
    """The newest version of ``name`` whose tag ``tag`` is ``value`` (None: none, or no such model)."""
    versions = client.search_model_versions(f"name = '{name}'")
    tagged = [v for v in versions if (v.tags or {}).get(tag) == value]
    return max(tagged, key=lambda v: int(v.version)) if tagged else None


def version_aliases(client, name: str, version: str) -> list[str]:
    """The aliases of ``name`` that point at ``version``, sorted."""
    aliases = client.get_registered_model(name).aliases or {}
    return sorted(a for a, v in aliases.items() if str(v) == str(version))


HISTORY_TAG = "promotion.history"
HISTORY_HEADING = "## Promotion history"


def record_promotion(client, name: str, version: str, note: str, event: str = "") -> None:
    """Set the version's ``promotion`` tag to ``note`` and append it, timestamped, to its
    ``promotion.history`` tag (JSON; the oldest entries give way past ~4,500 characters); the
    model card (the version's description) gets its aliases and history section regenerated."""
    import json
    from datetime import UTC, datetime

    client.set_model_version_tag(name, version, "promotion", note)
    mv = client.get_model_version(name, version)
    try:
        history = json.loads((mv.tags or {}).get(HISTORY_TAG, "[]"))
    except ValueError:
        history = []
    history.append({"at": datetime.now(UTC).isoformat(timespec="seconds"), "note": f"{event}{note}"})
    text = json.dumps(history)
    while len(text) > 4500 and len(history) > 1:
        history.pop(0)
        text = json.dumps(history)
    client.set_model_version_tag(name, version, HISTORY_TAG, text)
    aliases = version_aliases(client, name, version)
    card = (mv.description or "").split(f"\n{HISTORY_HEADING}\n")[0].rstrip()
    section = [HISTORY_HEADING, "", f"Aliases now: {', '.join(aliases) or 'none'}", ""]
    section += [f"- {entry['at']}: {entry['note']}" for entry in history]
    client.update_model_version(name, version, description=f"{card}\n\n" + "\n".join(section) + "\n")


def registered_by_run(name: str, pipeline_run: str, tracking_uri: str) -> Registration | None:
    """The registration pipeline run ``pipeline_run`` made of ``name`` (its ``pipeline_run`` tag),
    or None: a retried register step returns it instead of registering the weights twice."""
    from mlflow.tracking import MlflowClient

    if not pipeline_run:
        return None
    client = MlflowClient(tracking_uri=tracking_uri)
    v = newest_tagged(client, name, PIPELINE_RUN_TAG, pipeline_run)
    if v is None:
        return None
    aliases = version_aliases(client, name, str(v.version))
    metrics = dict(client.get_run(v.run_id).data.metrics) if v.run_id else {}
    return Registration(
        name, str(v.version), aliases, CHAMPION in aliases, run_id=v.run_id or "", metrics=metrics
    )


def version_for_source(name: str, fingerprint: str, tracking_uri: str) -> str | None:
    """The newest version of ``name`` registered from a source with this fingerprint (its
    ``source_fingerprint`` tag), or None: then the source has data no registered version saw."""
    from mlflow.tracking import MlflowClient

    version = newest_tagged(MlflowClient(tracking_uri=tracking_uri), name, SOURCE_TAG, fingerprint)
    return str(version.version) if version is not None else None


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
    earlier = registered_by_run(name, all_tags.get(PIPELINE_RUN_TAG, ""), tracking_uri)
    if earlier is not None:  # a retried register task: the version this pipeline run made
        log.info(
            "%s v%s was registered by pipeline run %s already",
            name,
            earlier.version,
            all_tags[PIPELINE_RUN_TAG],
        )
        return earlier
    with client_run(tracking_uri, EXPERIMENT, f"register-{name}", all_tags) as run:
        client = run.client
        for key, value in metrics.items():
            client.log_metric(run.run_id, key, float(value))
        for entry in sorted(model_dir.iterdir()):  # the served pipeline: the raw weights stay behind
            if entry.name == RAW_TRANSFORMER_DIR:
                continue
            if entry.is_dir():
                client.log_artifacts(run.run_id, str(entry), artifact_path=f"{ARTIFACT_DIR}/{entry.name}")
            else:
                client.log_artifact(run.run_id, str(entry), artifact_path=ARTIFACT_DIR)
        try:
            client.get_registered_model(name)
        except MlflowException:  # not registered yet
            client.create_registered_model(name, description="Lumina-Image 2.0-style text-to-image pipeline")
        source = f"{run.artifact_uri}/{ARTIFACT_DIR}"
        version = client.create_model_version(name, source=source, run_id=run.run_id, tags=all_tags)
        champion = current_champion(client, name)
        result = gate.evaluate(metrics, champion[1] if champion else None)
        reasons = result.reasons
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        aliases = [CHALLENGER]
        if not reasons:
            client.set_registered_model_alias(name, CHAMPION, version.version)
            aliases.append(CHAMPION)
        champion_version = champion[0] if champion else ""
        card = model_card(
            name,
            str(version.version),
            model_dir,
            metrics,
            all_tags,
            aliases,
            reasons,
            result,
            champion_version,
        )
        client.update_model_version(name, version.version, description=card)
        record_promotion(client, name, str(version.version), result.summary(), event="registered: ")
        card = client.get_model_version(name, version.version).description  # with its history section
        client.log_text(run.run_id, card, "model_card.md")
    log.info("registered %s v%s aliases=%s %s", name, version.version, aliases, result.summary())
    return Registration(
        name,
        str(version.version),
        aliases,
        not reasons,
        reasons,
        run.run_id,
        result.notes,
        result.deltas,
        champion_version,
        {key: float(value) for key, value in metrics.items()},
    )


def download_version(uri: str, dest: str | Path, tracking_uri: str | None = None) -> Path:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` → a local diffusers folder
    (:func:`storage.registry.fetch_mlflow`, shared with the server's fetch: staged download into an
    empty or earlier-download ``dest``)."""
    from storage.registry import fetch_mlflow

    if not uri.startswith("models:/"):
        raise ConfigError(f"not a registry URI: {uri!r} (expected models:/<name>@<alias>)")
    return fetch_mlflow(uri, Path(dest), tracking_uri)
