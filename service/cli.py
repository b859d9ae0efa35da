"""`polyreward serve`, `polyreward tune` and `polyreward score` (registered as `polyreward.commands` entry points).

`score` is the service's engine without HTTP: the same scorer and post-processing over a JSONL file.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from polyreward.models.cli import (
    DEVICE_HELP,
    PRECISION_HELP,
    DeviceChoice,
    DeviceOption,
    PrecisionChoice,
    PrecisionOption,
    RulesOption,
    default_is,
)
from polyreward.models.runtime.batching import DEFAULT_MAX_ITEMS, DEFAULTS_TEXT


class SpaceChoice(str, Enum):
    debiased = "debiased"
    raw = "raw"


TokenBudget = Annotated[
    int | None, typer.Option(help="max padded tokens per batch" + default_is(DEFAULTS_TEXT))
]


def serve(
    artifacts: Annotated[
        list[Path] | None,
        typer.Argument(
            help="artifact directories, or directories of artifacts (a mounted model volume)"
            + default_is("the shipped default model, built once into ~/.cache/polyreward"),
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
    profiles: Annotated[
        Path | None,
        typer.Option(
            help="reward profiles (YAML): named recipes and the default one (also POLYREWARD_PROFILES)"
        ),
    ] = None,
    rules: RulesOption = None,
    precision: Annotated[
        PrecisionChoice | None, typer.Option(help=PRECISION_HELP + default_is("auto"))
    ] = None,
    device: Annotated[DeviceChoice | None, typer.Option(help=DEVICE_HELP + default_is("auto"))] = None,
    max_queue_items: Annotated[
        int | None, typer.Option(help="queued items before 429" + default_is("4096"))
    ] = None,
    request_timeout: Annotated[
        float | None, typer.Option(help="seconds before 504" + default_is("60"))
    ] = None,
    drain_seconds: Annotated[
        float | None,
        typer.Option(help="after SIGTERM, seconds /ready answers 503 before shutdown" + default_is("5")),
    ] = None,
) -> None:
    """Serve vector rewards over HTTP: /v1/score, /v1/compare, /get_reward (OpenRLHF), /v1/models, /metrics.

    The port opens at once; /health answers while the models load, /ready answers 200 once they are loaded and
    warm. Settings come from POLYREWARD_* environment variables (POLYREWARD_ARTIFACTS, POLYREWARD_PORT, …);
    flags given here override them. Several artifacts are served side by side, chosen by the request's `model`.
    """
    import uvicorn
    from pydantic import ValidationError

    from polyreward.models.default import default_artifact
    from polyreward.models.runtime.artifact import find_artifacts
    from polyreward.models.runtime.errors import PolyrewardError, describe
    from polyreward.service.app import create_app
    from polyreward.service.server import DrainingServer
    from polyreward.service.settings import Settings

    flags = {
        "api_key_file": api_key_file, "profiles": profiles, "rules": rules, "precision": precision and precision.value, "device": device and device.value,
        "max_queue_items": max_queue_items, "request_timeout": request_timeout, "drain_seconds": drain_seconds,
    }  # fmt: skip
    if config:
        os.environ["POLYREWARD_CONFIG"] = str(config)  # read by Settings, below flags and variables
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        where = f"POLYREWARD_* variables or {config}" if config else "POLYREWARD_* variables"
        raise PolyrewardError(f"settings ({where}): {describe(e)}") from None
    paths = (
        [p for path in artifacts for p in find_artifacts(path)] if artifacts else None
    )  # bad paths fail now
    app = create_app(paths or (lambda: [default_artifact()]), settings)  # the default is built when loading
    server = DrainingServer(
        uvicorn.Config(
            app, host=host, port=port, log_level="info", access_log=False,
            timeout_graceful_shutdown=int(settings.request_timeout) + 5,
        ),
        settings.drain_seconds,
    )  # fmt: skip
    server.run()
    if server.failure:
        raise PolyrewardError(server.failure)


def tune(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    input: Annotated[
        Path | None,
        typer.Option(
            help="JSONL items like your traffic ({messages} | {prompt, response} | {text} per line)"
            + default_is("the packaged sample: 40 conversations of mixed length"),
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="settings file to write (serve --config / POLYREWARD_CONFIG)")
    ] = Path("polyreward-serve.json"),
    precision: PrecisionOption = PrecisionChoice.auto,
    device: DeviceOption = DeviceChoice.auto,
    budgets: Annotated[
        str | None,
        typer.Option(
            help="comma-separated padded-token budgets to try" + default_is("128..2048 CPU, 4096..65536 GPU")
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per candidate (median)")] = 3,
) -> None:
    """Measure batching settings on this machine and write the fastest for `polyreward serve --config`.

    Tries padded-token budgets and item caps on the same items, prints every candidate's items/s, and writes
    the best with the measurement beside it.
    """
    from polyreward.models.runtime.items import read_items_jsonl, sample_items
    from polyreward.service.tune import trial_row, write
    from polyreward.service.tune import tune as run_tune

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
        artifact, items, precision=precision.value, device=device.value, budgets=wanted, repeats=repeats,
        progress=lambda t: typer.echo(json.dumps(trial_row(t)), err=True),
    )  # fmt: skip
    write(settings, out)
    tuned = settings["tuned"]
    typer.echo(
        f"best: token_budget {settings['token_budget']}, max_batch_items {settings['max_batch_items']}: "
        f"{tuned['items_per_s']} items/s ({settings['precision']}, {tuned['provider']}; "
        f"defaults {tuned['default_items_per_s']})\nwrote {out}; use: polyreward serve --config {out}"
    )


def weights_option(value: str | None) -> dict[str, float] | None:
    """`helpfulness=1,safety=2` → {"helpfulness": 1.0, "safety": 2.0}."""
    if value is None:
        return None
    out = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, number = part.partition("=")
        try:
            out[name.strip()] = float(number)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise typer.BadParameter(
                f"{part!r}: expected OBJECTIVE=WEIGHT, e.g. helpfulness=1", param_hint="--weights"
            )
    return out


def score(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    input: Annotated[
        Path, typer.Option(help='JSONL: {"messages": [...]} | {"prompt", "response"} | {"text"} per line')
    ],
    precision: PrecisionOption = PrecisionChoice.auto,
    device: DeviceOption = DeviceChoice.auto,
    token_budget: TokenBudget = None,
    max_batch_items: Annotated[int, typer.Option(help="max items per batch")] = DEFAULT_MAX_ITEMS,
    profiles: Annotated[
        Path | None, typer.Option(help="reward profiles file (YAML), as `serve --profiles`")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="the profile to apply" + default_is("the file's default"))
    ] = None,
    rules: RulesOption = None,
    space: Annotated[
        SpaceChoice | None, typer.Option(help="objectives as debiased (rewards @ T) or raw head outputs")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(help="OBJECTIVE=WEIGHT,...: score = Σ w·x instead of the gating (as /v1/score)"),
    ] = None,
    normalize: Annotated[
        bool | None, typer.Option(help="z-score objectives with the model's stats for the space")
    ] = None,
    pessimism: Annotated[float | None, typer.Option(help="κ: score − κ·σ(score), epistemic", min=0)] = None,
) -> None:
    """Score a JSONL file; writes one JSON line per input line to stdout (other input fields carried through):
    score, rewards (in the recipe's space), raw values, gating and (for heads that carry it) uncertainty, each
    objective by name. Items of the same prompt in the file form a group (transform.reference 'group')."""
    from polyreward.models.runtime.builder import InputRejected
    from polyreward.models.runtime.items import InvalidItem, read_items_jsonl
    from polyreward.models.runtime.rules import MissingLabel, RuleSet
    from polyreward.models.runtime.scorer import Scorer
    from polyreward.service.postprocess import Recipe, named, prompt_key
    from polyreward.service.profiles import Profiles
    from polyreward.service.recipe import Pessimism, RecipeSpec, merge

    items, extras, lines = read_items_jsonl(input)
    scorer = Scorer(
        artifact, precision=precision.value, device=device.value, token_budget=token_budget,
        max_batch_items=max_batch_items,
    )  # fmt: skip
    given = {
        "space": space and space.value, "weights": weights_option(weights), "normalize": normalize,
        "pessimism": None if pessimism is None else Pessimism(kappa=pessimism),
    }  # fmt: skip
    checks = RuleSet.load(rules)
    checks.check(scorer.objectives)
    _, base = Profiles.load(profiles).spec(profile)
    recipe = Recipe.build(
        scorer.manifest, merge(base, RecipeSpec(**{k: v for k, v in given.items() if v is not None})),
        checks.names,
    )  # fmt: skip
    names = recipe.names
    try:
        checks.check_labels(items)
        results, removed, evaluation = checks.score(scorer, items, progress=sys.stderr.isatty())
    except InputRejected as e:
        raise InvalidItem(f"{input}:{lines[e.index]}: {e.reason}") from None
    except MissingLabel as e:
        raise InvalidItem(f"{input}:{lines[e.index]}: {e}") from None
    finally:
        checks.close()
    wanted = ["uncertainty"] if results and results[0].uncertainty is not None else []
    rows = recipe.apply(results, [prompt_key(it) for it in items], extras=wanted)
    for extra, r, row, cut, errors in zip(extras, results, rows, removed, evaluation.errors, strict=True):
        out = {**extra, "score": row["score"], "rewards": named(names, row["rewards"])}
        out["raw"] = {"score": r.score, "rewards": named(names, r.rewards)}
        for key in ("gating", "transformed"):
            if key in row:
                out[key] = named(names, row[key])
        for key in ("group_probs", "group_scores"):  # mixture models
            if key in row:
                out[key] = named(recipe.groups, row[key])
        out |= {"tokens": r.tokens, "truncated": r.truncated}
        if checks.file.strip:
            out["stripped_chars"] = cut
        if errors:
            out["rule_errors"] = errors
        if "slack" in row:
            out["slack"] = row["slack"]
        if "uncertainty" in row:
            u = row["uncertainty"]
            out["uncertainty"] = {
                "epistemic": named(names, u["epistemic"]), "predictive": named(names, u["predictive"]),
                "score": u["score"],
            }  # fmt: skip
        sys.stdout.write(json.dumps(out) + "\n")
