"""`polyreward train ...` commands (registered through the `polyreward.commands` entry point)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from models.inputs import InvalidItem, Item, read_items_jsonl

app = typer.Typer(help="Train reward heads on your rating and preference data.", no_args_is_help=True)


def read_ratings_jsonl(path: Path, objectives: list[str] | None) -> tuple[list[Item], np.ndarray, list[str]]:
    """Items with `"ratings": {objective: number | null}`; returns (items, labels [N, K] with NaN, names)."""
    items, extras, lines = read_items_jsonl(path)
    rows = []
    for extra, line in zip(extras, lines, strict=True):
        ratings = extra.get("ratings")
        if not isinstance(ratings, dict):
            raise InvalidItem(f"{path}:{line}: ratings: expected an object of objective -> number")
        for name, value in ratings.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise InvalidItem(f"{path}:{line}: ratings.{name}: expected a number or null, got {value!r}")
        rows.append(ratings)
    names = objectives or sorted({name for r in rows for name in r})
    if not names:
        raise InvalidItem(f"{path}: no ratings found")
    labels = np.array([[_num(r.get(n)) for n in names] for r in rows], np.float64)
    for name, count in zip(names, (~np.isnan(labels)).sum(0), strict=True):
        if count < 2:
            raise InvalidItem(
                f"{path}: objective {name!r} has {count} ratings; at least 2 are needed to fit it"
            )
    return items, labels, names


def _num(v) -> float:
    return math.nan if v is None else float(v)


@app.command()
def objectives(
    data: Annotated[Path, typer.Option(help='JSONL: item fields plus "ratings": {objective: value}')],
    out: Annotated[Path, typer.Option(help="heads file to write (.safetensors)")],
    backbone: Annotated[
        Path | None, typer.Option(help="Hugging Face model directory [default: bundled all-MiniLM-L6-v2]")
    ] = None,
    objective: Annotated[
        list[str] | None, typer.Option(help="objective to fit (repeatable) [default: every key in ratings]")
    ] = None,
    alpha: Annotated[float, typer.Option(help="ridge regularization strength")] = 1.0,
) -> None:
    """Stage 1: fit one linear reward head per objective by ridge regression on absolute ratings.

    Missing ratings are allowed (each objective uses the rows that have it). The heads combine objectives
    with fixed equal weights; export them with `polyreward export --heads OUT`.
    """
    from models.cli import default_backbone
    from models.heads import save_heads
    from models.objectives import Objective
    from training.stage1 import fit_objectives

    items, labels, names = read_ratings_jsonl(data, objective)
    heads, fitted = fit_objectives(
        backbone or default_backbone(),
        items,
        labels,
        [Objective(name=n, source=f"{data.name}:ratings.{n}") for n in names],
        alpha=alpha,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_heads(heads, out)
    for k, name in enumerate(names):
        rows = ~np.isnan(labels[:, k])
        r = np.corrcoef(fitted[rows, k], labels[rows, k])[0, 1]
        typer.echo(f"{name}: {int(rows.sum())} labels, training-set Pearson r = {r:.3f}", err=True)
    typer.echo(f"wrote {out}", err=True)
