"""`polyreward serve`: the scoring service (registered through the `polyreward.commands` entry point)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_CACHE = Path(os.environ.get("POLYREWARD_CACHE", Path.home() / ".cache" / "polyreward"))


def default_artifact() -> Path:
    """The shipped default model, exported once into the cache (the export needs the `train` extra)."""
    from models.cli import default_model

    _, shipped = default_model()
    out = DEFAULT_CACHE / f"{shipped['name']}-{shipped['version']}"
    if not (out / "manifest.json").exists():
        typer.echo(f"building the default model into {out} (once)", err=True)
        # A subprocess: the export imports torch, which the serving process never does.
        subprocess.run(
            [sys.executable, "-m", "models.cli", "export", "--default", "--out", str(out), "--overwrite"],
            check=True,
        )
    return out


def serve(
    artifacts: Annotated[
        list[Path] | None,
        typer.Argument(
            help="artifact directories, or directories of artifacts (a mounted model volume); "
            "none: the shipped default model",
            envvar="POLYREWARD_ARTIFACTS",  # several: separated by ':'
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on", envvar="POLYREWARD_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", envvar="POLYREWARD_PORT")] = 8000,
    api_key_file: Annotated[
        Path | None, typer.Option(help="file with one API key per line (also POLYREWARD_API_KEYS)")
    ] = None,
    precision: Annotated[str | None, typer.Option(help="auto|fp32|int8|fp16")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda|tensorrt")] = None,
    max_queue_items: Annotated[int | None, typer.Option(help="queued items before 429")] = None,
    request_timeout: Annotated[float | None, typer.Option(help="seconds before 504")] = None,
    drain_seconds: Annotated[
        float | None,
        typer.Option(help="after SIGTERM, seconds /ready answers 503 before shutdown", show_default="5"),
    ] = None,
) -> None:
    """Serve vector rewards over HTTP: /v1/score, /v1/compare, /get_reward (OpenRLHF), /v1/models, /metrics.

    Settings come from POLYREWARD_* environment variables (POLYREWARD_ARTIFACTS, POLYREWARD_PORT, …);
    flags given here override them.

    Several artifacts are served side by side, chosen by the request's `model` field.
    """
    import uvicorn

    from models.artifact import find_artifacts
    from service.app import Settings, create_app
    from service.server import DrainingServer

    flags = {
        "api_key_file": api_key_file, "precision": precision, "device": device,
        "max_queue_items": max_queue_items, "request_timeout": request_timeout,
        "drain_seconds": drain_seconds,
    }  # fmt: skip
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    paths = [p for path in artifacts for p in find_artifacts(path)] if artifacts else [default_artifact()]
    app = create_app(paths, settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout) + 5,
    )  # fmt: skip
    DrainingServer(config, settings.drain_seconds).run()
