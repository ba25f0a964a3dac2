"""``python -m pipelines``: run the pipeline locally or on Kubeflow, compile it, schedule it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from common.cli import run_cli
from common.errors import ConfigError, error_summary

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The lumina Kubeflow pipeline.")
COMPILED = Path(__file__).with_name("lumina_pipeline.yaml")
EXPERIMENT = "lumina"


def _arguments(
    profile: str,
    model_name: str,
    steps: str | None,
    eval_suite_size: int,
    gate: Path | None,
    extra: list[str] | None,
) -> dict[str, Any]:
    """Pipeline arguments from the CLI options (``--param key=value`` for anything else)."""
    import yaml

    from model.profiles import get_profile

    get_profile(profile)  # an unknown profile fails here, not three steps into the run
    args: dict[str, Any] = {"profile": profile, "model_name": model_name}
    if steps:
        parts = steps.split(",")
        if len(parts) not in (3, 4) or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(
                "--steps takes three or four counts LOWRES,HIGHRES,HQ[,UNIFIED] (e.g. 200,60,30,30),"
                f" got {steps!r}"
            )
        names = ("lowres_steps", "highres_steps", "hq_steps", "unified_steps")
        args.update(zip(names, map(int, parts), strict=False))
    args["eval_config_json"] = json.dumps({"suite_size": eval_suite_size})
    if gate is not None:
        from common.config_files import read_yaml_mapping
        from components.register.register import PromotionGate

        checked = PromotionGate.model_validate(read_yaml_mapping(gate, "gate file"))  # fail before running
        args["gate_json"] = checked.model_dump_json()
    for item in extra or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--param wants key=value, got {item!r}")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:  # not a number or flag: passed on as the string it is
            parsed = value
        args[key] = parsed if isinstance(parsed, int | float | bool) else value  # JSON stays a string
    if args.get("grid_config_json"):  # checked here, not in four grid tasks after the data steps
        from components.grids.grid import parse_grid_config

        parse_grid_config(str(args["grid_config_json"]))
    return args


LOCAL_GROUP_SIZE = 160  # the sample data in 4 groups, so the embedded default really fans out
# The embedded default's tiers (a local tiny run; --param tier_config_json= overrides them). The
# paper's 10 % / 1 % of the ~550 sample images would leave stage 2 the 128-image floor and stage 3
# 64 images, and the tiny model then forgets at 128 px what it learnt at 64 px (README, issue #12):
# here stage 2 trains on every image of at least 128 px and stage 3 on the best quarter.
LOCAL_TIERS = {"highres_ratio": 1.0, "hq_ratio": 0.25}


def _lineage(data_version: str = "") -> dict[str, str]:
    """Lineage arguments of a cluster run: the code's git sha (tagged on the registered version)."""
    from components.tracking import git_sha

    lineage = {"git_sha": git_sha(Path(__file__).resolve().parents[1])}
    return {**lineage, "data_version": data_version} if data_version else lineage


def check_base_model(source: str, local: bool) -> str:
    """What can be checked of ``--base-model`` before the run: a local folder exists and holds a
    diffusers pipeline (made absolute for the local runner's task processes)."""
    from storage.models import is_hub_id

    if source.startswith(("s3://", "models:/")) or is_hub_id(source):
        return source
    folder = Path(source).expanduser()
    if not (folder / "model_index.json").is_file():
        what = "not found" if not folder.exists() else "not a diffusers pipeline folder (no model_index.json)"
        raise ConfigError(f"--base-model {source}: {what}")
    return str(folder.resolve()) if local else source


def local_vae(source: str, profile: str, given: Any = None) -> dict[str, str]:
    """The ``vae`` argument of a local run: ``--param vae=`` as given ("" keeps the profile's random
    VAE; a folder is checked and made absolute), else for the ``tiny`` profile the VAE that
    ``make sample-data`` trained into ``<data>/vae/tiny`` beside the source (``<data>/raw``) when
    there is one, else nothing."""
    from storage import is_s3

    if given is not None:
        if not str(given):
            return {"vae": ""}
        from model.vae_training import find_vae

        found = find_vae(Path(str(given)).expanduser())
        if found is None:
            raise ConfigError(f"--param vae={given}: no trained VAE there (no config.json)")
        return {"vae": str(found.resolve())}
    if profile != "tiny" or is_s3(source) or not (Path(source).parent / "vae" / "tiny").is_dir():
        return {}
    from model.vae_training import find_vae

    found = find_vae(Path(source).parent / "vae" / "tiny", data_dir=source)
    return {"vae": str(found.resolve())} if found is not None else {}


def check_host(host: str, token: str | None, timeout_s: float = 10.0) -> None:
    """One request to the API's health endpoint before anything else: an unreachable or refusing
    host is one line, not kfp's retry traceback."""
    import urllib.error
    import urllib.request

    if not host.startswith(("http://", "https://")):
        raise ConfigError(f"--host {host!r}: expected an http:// or https:// URL")
    request = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(
                f"Kubeflow Pipelines at {host} refused the request (HTTP {exc.code}): check --token"
            ) from None
        return  # the host answers; the API call itself will say what is wrong
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(f"cannot reach Kubeflow Pipelines at {host}: {reason}") from None


def metric_lines(metrics: dict[str, float]) -> list[str]:
    """The summary's evaluation lines: held-out loss and the compositional scores, when present."""
    lines = []
    if "val_loss" in metrics:
        lines.append(f"held-out loss    : {metrics['val_loss']:.4f}")
    scores = {k.removeprefix("synthetic_"): v for k, v in metrics.items() if k.startswith("synthetic_")}
    if scores:
        lines.append("compositional    : " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    from components.evaluate.report import PANEL_METRICS

    panels = [(k, metrics[k], metrics.get(f"{k}_before")) for k, _ in PANEL_METRICS if k in metrics]
    if panels:
        shown = [f"{k.removeprefix('panel_')} {v:.2f}" + ("" if b is None else f" (before unified {b:.2f})")
                 for k, v, b in panels]  # fmt: skip
        lines.append("grid panels      : " + ", ".join(shown))
    return lines


def stage_lines(tracking_uri: str, name: str, version: str) -> list[str]:
    """The summary's per-stage line: each stage's compositional scores on held-out synthetic prompts
    (``val_*`` of the stage runs the registered version is tagged with), and the resolution they
    were sampled at (``val_resolution``: one for every stage, or each stage's own)."""
    from mlflow.tracking import MlflowClient

    from components.train.config import Stage

    try:
        client = MlflowClient(tracking_uri)
        tags = client.get_model_version(name, version).tags
        runs = [client.get_run(tags[f"run.{s}"]).data for s in Stage if tags.get(f"run.{s}")]
    except Exception as exc:  # the summary must not fail a finished run
        return [f"by stage         : not available ({error_summary(exc, 120)})"]
    shown = [
        f"{kind} " + " -> ".join(f"{r.metrics[f'val_{kind}']:.2f}" for r in runs)
        for kind in ("colors", "presence")
        if runs and all(f"val_{kind}" in r.metrics for r in runs)
    ]
    sizes = {r.params.get("val_resolution", "None") for r in runs}
    where = (
        f"at {sizes.pop()} px" if len(sizes) == 1 and "None" not in sizes else "at each stage's resolution"
    )
    return [f"by stage         : {'; '.join(shown)} ({where})"] if shown else []


def check_services(source: str, mlflow_server: bool) -> None:
    """What a local run reaches besides its own folders, checked before it starts: an ``s3://``
    source has objects under it (credentials, endpoint and bucket work), and a tracking server
    named by ``MLFLOW_TRACKING_URI`` answers its health check."""
    import os
    import urllib.error
    import urllib.request

    from storage import is_s3, list_objects

    if is_s3(source):
        next(iter(list_objects(source)), None)  # StorageError: one line (no such bucket, nothing under...)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")) and not mlflow_server:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
                pass
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"cannot reach MLflow at {uri}: {getattr(exc, 'reason', exc)}") from None


def check_writable(folder: Path) -> None:
    """``--out`` can be created and written (checked before the run starts)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {folder}: not writable ({exc.strerror or exc})") from None


def _client(host: str, token: str | None):
    import kfp

    check_host(host, token)
    return kfp.Client(host=host, existing_token=token)


@app.command()
def run(
    source: Annotated[str, typer.Option(help="images: folder, .tar shard or s3:// prefix")] = "data/raw",
    local: Annotated[bool, typer.Option("--local/--no-local", help="kfp local runner (default)")] = True,
    host: Annotated[
        str | None, typer.Option(help="Kubeflow Pipelines API to submit to (implies --no-local)")
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="KFP_TOKEN", help="bearer token for --host")] = None,
    out: Annotated[Path, typer.Option(help="local outputs (kfp artifacts, mlflow)")] = Path("outputs"),
    profile: str = "tiny",
    model_name: str = "lumina-tiny",
    steps: Annotated[
        str | None, typer.Option(help="steps per stage LOWRES,HIGHRES,HQ[,UNIFIED] (default: profile's)")
    ] = None,
    unified: Annotated[
        bool | None,
        typer.Option(
            "--unified/--no-unified",
            help="the extra Template C grid phase after HQ (default: on locally, the pipeline's on a host)",
        ),
    ] = None,
    eval_suite_size: Annotated[int, typer.Option(help="prompts per benchmark category")] = 1,
    gate: Annotated[Path | None, typer.Option(help="YAML promotion gate (PromotionGate fields)")] = None,
    param: Annotated[list[str] | None, typer.Option(help="extra pipeline argument key=value")] = None,
    mlflow_server: Annotated[bool, typer.Option(help="start a real mlflow server on loopback")] = False,
    dvc_data: Annotated[Path | None, typer.Option(help="data folder to version with DVC first")] = None,
    parallelism: Annotated[
        int, typer.Option(min=1, help="groups at once per ParallelFor (local runner)")
    ] = 2,
    group_size: Annotated[
        int | None,
        typer.Option(
            min=1, help=f"source entries per group (the fan-out unit; local default {LOCAL_GROUP_SIZE})"
        ),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            help="start the first stage from these weights: hub id (e.g. Alpha-VLLM/Lumina-Image-2.0),"
            " diffusers folder, s3:// prefix or models:/<name>@<alias>"
        ),
    ] = None,
) -> None:
    """Run the pipeline: locally (embedded default) or on a Kubeflow host."""
    args = _arguments(profile, model_name, steps, eval_suite_size, gate, param)
    if unified is not None or not host:
        args.setdefault("unified", True if unified is None else unified)
    if base_model:
        if args.get("vae"):
            raise ConfigError(
                "--base-model and --param vae= exclude each other (the base model brings its VAE)"
            )
        args["base_model"] = check_base_model(base_model, local=not host)
    elif not host:
        args = {**args, **local_vae(source, profile, args.get("vae"))}
    if group_size is not None or not host:  # a cluster run keeps the pipeline's default unless asked
        args["group_size"] = group_size or LOCAL_GROUP_SIZE
    if not host and profile == "tiny":
        args.setdefault("tier_config_json", json.dumps(LOCAL_TIERS))
    if host:
        client = _client(host, token)
        result = client.create_run_from_pipeline_package(
            str(COMPILED), arguments={**_lineage(), **args, "source": source}, experiment_name=EXPERIMENT
        )
        typer.echo(json.dumps({"run_id": result.run_id, "host": host}))
        return
    if not local:
        raise ConfigError("--no-local needs --host")
    from pipelines.local import run_local

    check_writable(out)
    check_services(source, mlflow_server)
    result = run_local(
        source, out, args, mlflow_server=mlflow_server, dvc_data=dvc_data, parallelism=parallelism
    )
    if result.skipped:
        typer.echo(f"nothing trained   : {result.skipped}")
        return
    reg = result.registration
    typer.echo(f"registered model : {reg['name']} version {reg['version']}")
    typer.echo(
        f"aliases          : {', '.join(reg['aliases'])}"
        + ("" if reg["promoted"] else f"  (not champion: {'; '.join(reg['reasons'])})")
    )
    typer.echo(f"eval report      : {result.report}")
    stages = stage_lines(result.tracking_uri, reg["name"], reg["version"])
    for line in metric_lines(reg.get("metrics", {})) + stages:
        typer.echo(line)
    served = f"models:/{reg['name']}" + ("@champion" if reg["promoted"] else f"/{reg['version']}")
    typer.echo(f"serve it         : make serve PIPELINE_OUT={out} SERVE_MODEL={served}")
    typer.echo("                   (http://127.0.0.1:8080, API docs at /docs)")
    if result.data_version:
        typer.echo(f"data version     : {result.data_version} (DVC)")
    if result.tracking_uri.startswith("sqlite"):
        typer.echo(f"MLflow UI        : mlflow ui --backend-store-uri {result.tracking_uri}")
    else:
        typer.echo(
            f"MLflow           : {result.tracking_uri} (stopped with the run; its store is {out}/mlflow)"
        )


@app.command()
def compile(
    out: Annotated[Path, typer.Option(help="pipeline YAML for the Kubeflow UI")] = COMPILED,
    cluster: Annotated[Path | None, typer.Option(help="YAML of ClusterSettings overrides")] = None,
) -> None:
    """Compile the pipeline (with Kubernetes settings) to YAML."""
    from pipelines.compile import compile_pipeline

    typer.echo(str(compile_pipeline(out, cluster)))


@app.command()
def schedule(
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines API")],
    cron: Annotated[str, typer.Option(help="cron expression with seconds, e.g. '0 0 3 * * 0'")],
    token: Annotated[str | None, typer.Option(envvar="KFP_TOKEN")] = None,
    source: str = "s3://lumina-data/raw",
    name: str = "lumina-retrain",
    profile: str = "tiny",
    model_name: str = "lumina-tiny",
    max_concurrency: int = 1,
    data_version: Annotated[str, typer.Option(help="data version tag for the registered versions")] = "",
    retrain_unchanged: Annotated[
        bool, typer.Option(help="also train when the source is unchanged since the last registered version")
    ] = False,
) -> None:
    """Create a recurring run (scheduled retraining) from the compiled pipeline. Its runs carry the
    code's git sha (and ``--data-version``) as lineage; each run's plan fingerprints the source, so
    new objects under the prefix are ingested, and a run whose source is unchanged since a
    registered version ends early (``only_new_data``) instead of registering the same weights."""
    client = _client(host, token)
    experiment = client.create_experiment(EXPERIMENT)
    job = client.create_recurring_run(
        experiment_id=experiment.experiment_id,
        job_name=name,
        cron_expression=cron,
        pipeline_package_path=str(COMPILED),
        max_concurrency=max_concurrency,
        params={
            **_lineage(data_version),
            "source": source,
            "profile": profile,
            "model_name": model_name,
            "only_new_data": not retrain_unchanged,
        },
    )
    typer.echo(json.dumps({"recurring_run_id": job.recurring_run_id, "cron": cron}))


@app.command()
def status(
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines API")],
    run_id: Annotated[str | None, typer.Option(help="one run (default: the latest runs)")] = None,
    token: Annotated[str | None, typer.Option(envvar="KFP_TOKEN")] = None,
) -> None:
    """Show a run's state, or the latest runs."""
    client = _client(host, token)
    if run_id:
        r = client.get_run(run_id)
        typer.echo(json.dumps({"run_id": r.run_id, "state": str(r.state), "name": r.display_name}))
        return
    runs = client.list_runs(page_size=10, sort_by="created_at desc").runs or []
    for r in runs:
        typer.echo(f"{r.run_id}  {r.state}  {r.display_name}")


def main() -> None:
    run_cli(app)
