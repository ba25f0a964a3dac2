"""``python -m serving``: run the sampler server with uvicorn.

Options override the environment: ``--model`` replaces ``LUMINA_MODEL_SOURCE``,
``--defaults-file`` replaces ``LUMINA_DEFAULTS_FILE``. If the model cannot be loaded the server
logs one line and exits with code 2 (Kubernetes restarts it and shows the error).

Connection bounds (``LUMINA_TIMEOUT_KEEP_ALIVE_S``, ``LUMINA_MAX_HEADER_BYTES``,
``LUMINA_LIMIT_CONCURRENCY``, see :mod:`serving.settings`): uvicorn runs with its h11 protocol, so
the request head is bounded in size (h11's ``max_incomplete_event_size``; the httptools parser has
no such setting) and idle keep-alive connections close after the timeout. uvicorn cannot bound the
*time* a client takes to send its headers or body; that needs a proxy in front (the ingress).
The body size is bounded by the app itself (``max_body_bytes``, 413).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help="Serve a Lumina-Image 2.0 sampler over HTTP.")
log = logging.getLogger("serving")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind")] = 8080,
    model: Annotated[
        str | None,
        typer.Option(
            help="model source (overrides LUMINA_MODEL_SOURCE): models:/name@alias, s3://..., folder"
        ),
    ] = None,
    model_dir: Annotated[
        Path | None, typer.Option(help="download cache (overrides LUMINA_MODEL_DIR)")
    ] = None,
    defaults_file: Annotated[
        Path | None, typer.Option(help="YAML of defaults and limits (overrides LUMINA_DEFAULTS_FILE)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (overrides LUMINA_DEVICE)")] = None,
    threads: Annotated[
        int | None, typer.Option(help="torch CPU threads, 0 = torch default (overrides LUMINA_TORCH_THREADS)")
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve until SIGTERM / SIGINT; queued requests are cancelled on shutdown."""
    import uvicorn

    from common.cli import fail
    from serving.app import create_app
    from serving.settings import ServerSettings, load_defaults

    overrides = {
        k: v
        for k, v in {
            "model_source": model,
            "model_dir": model_dir,
            "defaults_file": defaults_file,
            "device": device,
            "torch_threads": threads,
        }.items()
        if v is not None
    }
    settings = ServerSettings(**overrides)
    defaults = load_defaults(settings.defaults_file)  # a bad file fails here, before binding
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    application = create_app(settings, defaults=defaults, on_load_error=on_load_error)
    config = uvicorn.Config(  # log_config=None: uvicorn's loggers use ours (text or JSON, common.logs)
        application,
        host=host,
        port=port,
        log_level=log_level,
        log_config=None,
        timeout_graceful_shutdown=30,
        http="h11",  # the protocol whose request-head size uvicorn can bound
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_keep_alive=settings.timeout_keep_alive_s,
        limit_concurrency=settings.limit_concurrency,
    )
    server = uvicorn.Server(config)
    server.run()
    if failed:
        fail(f"model failed to load: {failed[0]}")


def main() -> None:
    from common.cli import run_cli

    run_cli(app)


if __name__ == "__main__":
    main()
