"""`polyreward rescore`: registered through the `polyreward.commands` entry point."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from polyreward.models.cli import (
    DeviceChoice,
    DeviceOption,
    PrecisionChoice,
    PrecisionOption,
    RulesOption,
    default_is,
)
from polyreward.models.runtime.batching import DEFAULTS_TEXT


class EngineChoice(str, Enum):
    local = "local"
    remote = "remote"
    ray = "ray"


class KindChoice(str, Enum):
    pairs = "pairs"
    ratings = "ratings"
    bon = "bon"
    responses = "responses"


class OutputFormat(str, Enum):
    parquet = "parquet"
    jsonl = "jsonl"


LIST_OPTIONS = {"prompt", "id", "group", "label_a", "label_b", "label_tie"}


def build_spec(inputs: list[Path], kind: str | None, mapping: list[str], name: str | None):
    """A DatasetSpec from --kind/--map, or from the canonical schema of the first input's first row."""
    from pydantic import ValidationError

    from polyreward.models.runtime.errors import describe
    from polyreward.rescore.run import RescoreError
    from polyreward.training.data import DatasetSpec, canonical_options

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
        EngineChoice | None,
        typer.Option(help="where scoring runs" + default_is("local with --artifact, remote with --url")),
    ] = None,
    kind: Annotated[
        KindChoice | None,
        typer.Option(help="what a row holds" + default_is("from the first row of a canonical file")),
    ] = None,
    map: Annotated[
        list[str] | None,
        typer.Option(
            help="OPTION=FIELD, the trainer's dataset options (repeat): messages=conversation, chosen=..., "
            "rejected=..., response=..., prompt=a,b, hh=true, id=..., subset=..., objective=..., label=..."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="dataset name" + default_is("the first input's name"))
    ] = None,
    precision: PrecisionOption = PrecisionChoice.auto,
    device: DeviceOption = DeviceChoice.auto,
    rules: RulesOption = None,
    token_budget: Annotated[
        int | None, typer.Option(help="local and ray: padded tokens per batch" + default_is(DEFAULTS_TEXT))
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="remote: model name" + default_is("the served one"))
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="remote: Bearer key", envvar="POLYREWARD_API_KEY")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="remote: requests in flight")] = 4,
    ray_address: Annotated[
        str | None, typer.Option(help="ray: cluster address" + default_is("RAY_ADDRESS, or a local Ray"))
    ] = None,
    actors: Annotated[int, typer.Option(min=1, help="ray: Scorer actors (one model each)")] = 2,
    num_gpus: Annotated[float, typer.Option(min=0, help="ray: GPUs per actor")] = 0.0,
    shard_rows: Annotated[int, typer.Option(min=1, help="input rows per output shard")] = 2048,
    format: Annotated[OutputFormat, typer.Option(help="shard files")] = OutputFormat.parquet,
    resume: Annotated[bool, typer.Option(help="continue the run in --out")] = False,
    overwrite: Annotated[bool, typer.Option(help="discard the run in --out and start again")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
) -> None:
    """Rescore datasets with vector rewards: per side every objective's reward, the score and the gating
    weights; for pairs the margin, P(chosen > rejected) and agreement with the label. Shards are committed
    atomically, so a killed run continues with --resume without losing or duplicating a row."""
    from polyreward.rescore.engines import LocalEngine, RemoteEngine
    from polyreward.rescore.run import Run
    from polyreward.rescore.summary import summarize

    if resume and overwrite:
        raise typer.BadParameter("give either --resume or --overwrite", param_hint="--resume")
    engine = engine or (EngineChoice.remote if url else EngineChoice.local)
    if engine != EngineChoice.remote and artifact is None:
        raise typer.BadParameter(f"the {engine.value} engine needs --artifact", param_hint="--artifact")
    if engine == EngineChoice.remote and url is None:
        raise typer.BadParameter("the remote engine needs --url", param_hint="--url")
    if rules is not None and engine != EngineChoice.local:
        where = "the server's (serve --rules)" if engine == EngineChoice.remote else "not applied"
        raise typer.BadParameter(f"local engine only; {engine.value}: {where}", param_hint="--rules")
    spec = build_spec(inputs, kind and kind.value, map or [], name)
    local = {"precision": precision.value, "device": device.value, "token_budget": token_budget}
    if engine == EngineChoice.local:
        scorer = LocalEngine(artifact, **local, rules=rules)
    elif engine == EngineChoice.remote:
        scorer = RemoteEngine(url, model=model, api_key=api_key, concurrency=concurrency)  # type: ignore[arg-type]
    else:
        from polyreward.rescore.engines import RayEngine

        scorer = RayEngine(artifact, **local, address=ray_address, actors=actors, num_gpus=num_gpus)
    try:
        mode = "resume" if resume else "overwrite" if overwrite else "new"
        run = Run(inputs, spec, out, scorer, shard_rows=shard_rows, output_format=format.value, mode=mode)
        total = run.validate()  # every row through the adapters before any scoring
        if not quiet:
            typer.echo(f"{total} rows, {run.done_rows} already done; writing {out}", err=True)
        run.run(progress=not quiet and sys.stderr.isatty(), total=total)
    finally:
        scorer.close()
    typer.echo(json.dumps(summarize(out), indent=2))
