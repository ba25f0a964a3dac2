"""``python -m components.register``: look at a model's versions and promote (or roll back) by hand.

The tracking URI comes from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``.
"""

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from common.cli import run_cli

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MLflow registry operations.")

TrackingUri = Annotated[
    str, typer.Option("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
]


@app.command()
def versions(
    name: Annotated[str, typer.Argument(help="registered model name")],
    tracking_uri: TrackingUri = "",
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of a table")] = False,
) -> None:
    """List the versions, newest first: aliases, metrics, how each was (not) promoted."""
    from dataclasses import asdict

    from components.register.registry import list_versions

    rows = list_versions(name, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    for row in rows:
        created = datetime.fromtimestamp(row.created / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(row.metrics.items()))
        aliases = ",".join(row.aliases) or "-"
        typer.echo(f"v{row.version:<4} {created}  {aliases:<20} {metrics:<30} {row.promotion}")


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Argument(help="version number to promote")],
    alias: Annotated[str, typer.Option(help="alias to move (only champion is gated)")] = "champion",
    gate: Annotated[Path | None, typer.Option(help="YAML promotion gate (PromotionGate fields)")] = None,
    force: Annotated[bool, typer.Option(help="promote even if the gate refuses (e.g. a rollback)")] = False,
    tracking_uri: TrackingUri = "",
) -> None:
    """Move an alias to a version; refused (exit 2, nothing changed) when the gate says no."""
    from common.config_files import read_yaml_mapping
    from components.register.register import PromotionGate
    from components.register.registry import promote as promote_version

    checked = PromotionGate.model_validate(read_yaml_mapping(gate, "gate file")) if gate else None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    overridden = promote_version(name, version, uri, gate=checked, force=force, alias=alias)
    suffix = f" (forced past: {'; '.join(overridden)})" if overridden else ""
    typer.echo(f"{name} v{version} is now {alias}{suffix}")


if __name__ == "__main__":
    run_cli(app)
