"""`polyreward serve`: the scoring service (registered through the `polyreward.commands` entry point)."""

from __future__ import annotations

import json
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
    config: Annotated[
        Path | None,
        typer.Option(help="JSON settings file, e.g. from `polyreward tune`", envvar="POLYREWARD_CONFIG"),
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
    from pydantic import ValidationError

    from models.artifact import find_artifacts
    from models.errors import PolyrewardError, describe
    from service.app import Settings, create_app
    from service.server import DrainingServer

    flags = {
        "api_key_file": api_key_file, "precision": precision, "device": device,
        "max_queue_items": max_queue_items, "request_timeout": request_timeout,
        "drain_seconds": drain_seconds,
    }  # fmt: skip
    if config:
        os.environ["POLYREWARD_CONFIG"] = str(config)  # read by Settings, below flags and variables
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        where = f"POLYREWARD_* variables or {config}" if config else "POLYREWARD_* variables"
        raise PolyrewardError(f"settings ({where}): {describe(e)}") from None
    paths = [p for path in artifacts for p in find_artifacts(path)] if artifacts else [default_artifact()]
    app = create_app(paths, settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout) + 5,
    )  # fmt: skip
    DrainingServer(config, settings.drain_seconds).run()


def tune(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    input: Annotated[
        Path | None,
        typer.Option(
            help="JSONL items like your traffic ({messages} | {prompt, response} | {text} per line)",
            show_default="the packaged sample: 40 conversations of mixed length",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="settings file to write (serve --config / POLYREWARD_CONFIG)")
    ] = Path("polyreward-serve.json"),
    precision: Annotated[
        str, typer.Option(help="auto|fp32|int8|fp16 (auto: what serve would pick)")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|tensorrt")] = "auto",
    budgets: Annotated[
        str | None,
        typer.Option(
            help="comma-separated padded-token budgets to try", show_default="128..2048 CPU, 4096..65536 GPU"
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per candidate (median)")] = 3,
) -> None:
    """Measure batching settings on this machine and write the fastest for `polyreward serve --config`.

    Tries padded-token budgets and item caps on the same items, prints every candidate's items/s, and writes
    the best with the measurement beside it.
    """
    from models.inputs import read_items_jsonl
    from models.parity import sample_items
    from service.tune import trial_row, write
    from service.tune import tune as run_tune

    items = read_items_jsonl(input)[0] if input else sample_items()
    try:
        wanted = [int(b) for b in budgets.split(",")] if budgets else None
    except ValueError:
        raise typer.BadParameter(
            f"{budgets!r} is not a comma-separated list of integers", param_hint="--budgets"
        ) from None
    if wanted and min(wanted) < 64:
        raise typer.BadParameter("budgets must be at least 64 tokens", param_hint="--budgets")
    typer.echo(f"tuning {artifact} on {len(items)} items", err=True)
    settings, _ = run_tune(
        artifact, items, precision=precision, device=device, budgets=wanted, repeats=repeats,
        progress=lambda t: typer.echo(json.dumps(trial_row(t)), err=True),
    )  # fmt: skip
    write(settings, out)
    tuned = settings["tuned"]
    typer.echo(
        f"best: token_budget {settings['token_budget']}, max_batch_items {settings['max_batch_items']}: "
        f"{tuned['items_per_s']} items/s ({settings['precision']}, {tuned['provider']}; "
        f"defaults {tuned['default_items_per_s']})\nwrote {out}; use: polyreward serve --config {out}"
    )
