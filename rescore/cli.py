"""`polyreward rescore`: registered through the `polyreward.commands` entry point."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

LIST_OPTIONS = {"prompt", "id", "group", "label_a", "label_b", "label_tie"}


def build_spec(inputs: list[Path], kind: str | None, mapping: list[str], name: str | None):
    """A DatasetSpec from --kind/--map, or from the canonical schema of the first input's first row."""
    from pydantic import ValidationError

    from models.errors import describe
    from rescore.run import RescoreError
    from training.data import DatasetSpec, canonical_options

    options: dict = {}
    for entry in mapping:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise typer.BadParameter(
                f"{entry!r}: expected OPTION=FIELD, e.g. messages=conversation", param_hint="--map"
            )
        options[key] = value.split(",") if key in LIST_OPTIONS else value
    if kind is None and not options:
        options = canonical_options(inputs[0])
    elif kind is not None:
        options["kind"] = kind
    try:
        return DatasetSpec.model_validate(
            {
                "name": name or Path(inputs[0].name.removesuffix(".gz")).stem,
                "path": str(inputs[0]),
                "holdout": 1.0,
                **options,
            }
        )
    except ValidationError as e:
        raise RescoreError(f"--kind/--map: {describe(e, limit=1)}") from None


def rescore(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="JSONL, JSON, Parquet, CSV (optionally .gz) files or `datasets` save_to_disk directories"
        ),
    ],
    out: Annotated[Path, typer.Option(help="run directory: shards, run.json, summary.json, margins.png")],
    artifact: Annotated[Path | None, typer.Option(help="score in this process with this artifact")] = None,
    url: Annotated[
        str | None, typer.Option(help="score with a running `polyreward serve` at this URL")
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="local|remote|ray", show_default="local with --artifact, remote with --url"),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(
            help="pairs|ratings|bon|responses", show_default="from the first row of a canonical file"
        ),
    ] = None,
    map: Annotated[
        list[str] | None,
        typer.Option(
            help="OPTION=FIELD, the trainer's dataset options (repeat): messages=conversation, chosen=..., "
            "rejected=..., response=..., prompt=a,b, hh=true, id=..., subset=..., objective=..., label=..."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="dataset name", show_default="the first input's name")
    ] = None,
    precision: Annotated[str, typer.Option(help="local: auto|fp32|int8|fp16")] = "auto",
    device: Annotated[str, typer.Option(help="local: auto|cpu|cuda|tensorrt")] = "auto",
    token_budget: Annotated[
        int | None,
        typer.Option(help="local: padded tokens per batch", show_default="512 on CPU, 16384 on GPU"),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="remote: model name", show_default="the served one")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="remote: Bearer key", envvar="POLYREWARD_API_KEY")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="remote: requests in flight")] = 4,
    ray_address: Annotated[
        str | None, typer.Option(help="ray: cluster address", show_default="RAY_ADDRESS, or a local Ray")
    ] = None,
    actors: Annotated[int, typer.Option(min=1, help="ray: Scorer actors (one model each)")] = 2,
    num_gpus: Annotated[float, typer.Option(min=0, help="ray: GPUs per actor")] = 0.0,
    shard_rows: Annotated[int, typer.Option(min=1, help="input rows per output shard")] = 2048,
    format: Annotated[str, typer.Option(help="parquet|jsonl")] = "parquet",
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
    overwrite: Annotated[bool, typer.Option(help="discard the run in --out and start again")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Rescore datasets with vector rewards: per side every objective's reward, the score and the gating
    weights; for pairs the margin, P(chosen > rejected) and agreement with the label. Shards are committed
    atomically, so a killed run continues with --resume without losing or duplicating a row."""
    from rescore.engines import LocalEngine, RemoteEngine
    from rescore.run import Run
    from rescore.summary import summarize

    if resume and overwrite:
        raise typer.BadParameter("give either --resume or --overwrite", param_hint="--resume")
    if format not in ("parquet", "jsonl"):
        raise typer.BadParameter(f"{format!r} is not parquet or jsonl", param_hint="--format")
    engine = engine or ("remote" if url else "local")
    if engine in ("local", "ray") and artifact is None:
        raise typer.BadParameter(f"the {engine} engine needs --artifact", param_hint="--artifact")
    if engine == "remote" and url is None:
        raise typer.BadParameter("the remote engine needs --url", param_hint="--url")
    if engine not in ("local", "remote", "ray"):
        raise typer.BadParameter(f"{engine!r} is not local, remote or ray", param_hint="--engine")
    spec = build_spec(inputs, kind, map or [], name)
    if engine == "local":
        scorer = LocalEngine(artifact, precision=precision, device=device, token_budget=token_budget)
    elif engine == "remote":
        scorer = RemoteEngine(url, model=model, api_key=api_key, concurrency=concurrency)  # type: ignore[arg-type]
    else:
        from rescore.engines import RayEngine

        scorer = RayEngine(
            artifact, precision=precision, device=device, token_budget=token_budget, address=ray_address,
            actors=actors, num_gpus=num_gpus,
        )  # fmt: skip
    try:
        mode = "resume" if resume else "overwrite" if overwrite else "new"
        run = Run(inputs, spec, out, scorer, shard_rows=shard_rows, output_format=format, mode=mode)  # type: ignore[arg-type]
        total = run.validate()  # every row through the adapters before any scoring
        if not quiet:
            typer.echo(f"{total} rows, {run.done_rows} already done; writing {out}", err=True)
        run.run(progress=not quiet and sys.stderr.isatty(), total=total)
    finally:
        scorer.close()
    typer.echo(json.dumps(summarize(out), indent=2))
