"""Registry operations after registration: list a model's versions, promote one by hand (through
the same gate as the pipeline unless forced), which is also how a bad champion is rolled back."""

from __future__ import annotations

import getpass
import logging
from dataclasses import dataclass, field

from common.errors import ConfigError, LuminaError
from components.register.register import (
    CHAMPION,
    GateResult,
    PromotionGate,
    current_champion,
    record_promotion,
    tag_metrics,
)

log = logging.getLogger(__name__)


class PromotionRefused(LuminaError):
    """The gate refused the promotion (use ``force`` to override, e.g. for a rollback)."""

    def __init__(self, message: str, reasons: list[str], result: GateResult | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons
        self.result = result


@dataclass
class VersionInfo:
    version: str
    aliases: list[str]
    metrics: dict[str, float]
    promotion: str
    run_id: str
    created: int  # ms since the epoch
    tags: dict[str, str] = field(default_factory=dict)


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    if not tracking_uri:
        raise ConfigError("no MLflow tracking URI (set MLFLOW_TRACKING_URI or pass --tracking-uri)")
    return MlflowClient(tracking_uri=tracking_uri)


def list_versions(name: str, tracking_uri: str) -> list[VersionInfo]:
    """Every version of ``name``, newest first, with aliases, metrics and promotion notes."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise ConfigError(f"no registered model {name!r} at {tracking_uri}") from exc
    aliases: dict[str, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(str(number), []).append(alias)
    versions = client.search_model_versions(f"name = '{name}'")
    out = [
        VersionInfo(
            version=str(v.version),
            aliases=sorted(aliases.get(str(v.version), [])),
            metrics=tag_metrics(v.tags),
            promotion=v.tags.get("promotion", ""),
            run_id=v.run_id or "",
            created=int(v.creation_timestamp or 0),
            tags=dict(v.tags),
        )
        for v in versions
    ]
    return sorted(out, key=lambda v: int(v.version), reverse=True)


def promote(
    name: str,
    version: str,
    tracking_uri: str,
    *,
    gate: PromotionGate | None = None,
    force: bool = False,
    alias: str = CHAMPION,
) -> list[str]:
    """Point ``alias`` at ``version`` (any alias; only ``champion`` is gated). For ``champion`` the
    version's metrics must pass ``gate``
    against the current champion (:meth:`PromotionGate.evaluate`, as in the pipeline: a missing or
    non-finite metric never passes), unless ``force`` (a rollback to an older version usually needs
    it); refused → :class:`PromotionRefused` with the reasons, nothing changed. Returns the reasons
    that were overridden (empty when the gate passed). The version's ``promotion`` tag records it,
    with what could not be compared and the deltas against the champion it replaced."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        target = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ConfigError(f"model {name!r} has no version {version!r} at {tracking_uri}") from exc
    reasons: list[str] = []
    previous = ""
    extra: list[str] = []  # what the gate could not compare, and the deltas
    if alias == CHAMPION:
        champion = current_champion(client, name)
        previous = champion[0] if champion else ""
        if previous == str(target.version):
            return []  # already champion
        result = (gate or PromotionGate()).evaluate(
            tag_metrics(target.tags), champion[1] if champion else None
        )
        reasons = result.reasons
        extra = result.notes + ([result.comparison()] if result.comparison() else [])
        if reasons and not force:
            told = "; ".join(reasons + extra)
            message = f"{name} v{version} not promoted to {alias}: {told} (--force to override)"
            raise PromotionRefused(message, reasons, result)
    client.set_registered_model_alias(name, alias, target.version)
    try:
        who = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        who = "unknown"
    note = f"manual {alias} by {who}" + (f" replacing v{previous}" if previous else "")
    if reasons:
        note += f", forced past: {'; '.join(reasons)}"
    if extra:
        note += f"; {'; '.join(extra)}"
    record_promotion(client, name, str(target.version), note)
    if previous and alias == CHAMPION:
        record_promotion(client, name, previous, f"{alias} moved to v{target.version} by {who}")
    log.info("%s v%s is now %s (%s)", name, target.version, alias, note)
    return reasons
