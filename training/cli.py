"""`polyreward train ...` and `polyreward eval` (registered through the `polyreward.commands` entry point)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from polyreward.models.cli import PrecisionChoice, RulesOption, default_is

app = typer.Typer(
    help="Train multi-objective reward heads from a YAML config (see configs/default.yaml).",
    invoke_without_command=True,
    no_args_is_help=False,
)

Config = Annotated[Path, typer.Option(help="training config (YAML): datasets, backbone, stage settings")]
Out = Annotated[
    Path | None,
    typer.Option(help="work directory for caches, heads and the artifact" + default_is("from the config")),
]
Quiet = Annotated[bool, typer.Option(help="no progress bars")]


def _run(config: Path, out: Path | None, quiet: bool = False):
    from polyreward.training.config import load_config
    from polyreward.training.pipeline import Run

    return Run(load_config(config, out=str(out) if out else None), progress=not quiet and sys.stderr.isatty())


def _echo(obj) -> None:
    """Results to stdout as JSON (logs and progress go to stderr)."""
    typer.echo(json.dumps(obj, indent=2, default=float))


@app.callback()
def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="run the whole pipeline with this config")] = None,
    out: Out = None,
    quiet: Quiet = False,
) -> None:
    """Without a sub-command: featurize → objectives → gating → export → eval for --config.

    The artifact lands in OUT/artifact with report.json and plots; OUT/stage1.json and OUT/stage2.json hold
    the per-stage metrics, including the held-out comparison with the baselines.
    """
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    run = _run(config, out, quiet)
    run.featurize()
    run.stage1()
    run.stage2()
    artifact = run.export()
    report = run.evaluate()
    typer.echo(
        f"wrote {artifact} (held-out pair accuracy {report['accuracy']:.3f}, n={report['n']})", err=True
    )


@app.command()
def featurize(config: Config, out: Out = None, quiet: Quiet = False) -> None:
    """Embed every distinct conversation once (cached; a killed run resumes where it stopped)."""
    run = _run(config, out, quiet)
    _echo({"cache": str(run.cache.dir), **run.featurize()})


@app.command()
def objectives(config: Config, out: Out = None, quiet: Quiet = False) -> None:
    """Stage 1: ridge heads for rated objectives, Bradley–Terry heads for objectives labelled only by pairs,
    a verbosity head; regularization chosen per objective on a validation split. Writes OUT/stage1.safetensors.
    """
    _echo(_run(config, out, quiet).stage1())


@app.command()
def gating(config: Config, out: Out = None, quiet: Quiet = False) -> None:
    """Stage 2: verbosity debiasing transform, then the gating network (Bradley–Terry on pairs, early stopping).

    Needs stage 1 in OUT. Writes OUT/heads.safetensors and OUT/stage2.json with held-out baselines.
    """
    _echo(_run(config, out, quiet).stage2())


@app.command()
def mixture(
    config: Config,
    out: Out = None,
    routing: Annotated[
        str | None,
        typer.Option(
            help="latent: preference groups found without labels; category: one gating per task "
            "category, routed by a classifier" + default_is("the config's mixture.routing: latent")
        ),
    ] = None,
    components: Annotated[
        str | None,
        typer.Option(
            help="latent groups' weightings: fixed, or a gating network each"
            + default_is("the config's mixture.components: fixed")
        ),
    ] = None,
    groups: Annotated[
        list[int] | None,
        typer.Option(
            help="latent: the numbers of groups to try (repeatable; the smallest whose validation "
            "likelihood is within one standard error of the best wins)" + default_is("1 2 3 4")
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Pluralistic heads on stage 1's objectives: M groups, each a weighting of the debiased objectives, and a
    router on the prompt (latent: MiCRo-style mixture of Bradley–Terry models, no group labels; category:
    DMoERM-style task router). Needs stage 1 in OUT. Exports OUT/mixture-ROUTING/artifact (per item the
    group scores and the router's probabilities), evaluates it, and prints the fit and held-out comparison.
    """
    from pydantic import ValidationError

    from polyreward.models.runtime.errors import describe
    from polyreward.training.pluralistic import REPORT, train_mixture, work_dir

    run = _run(config, out, quiet)
    given = {"routing": routing, "components": components, "groups": groups}
    try:
        cfg = run.cfg.mixture.model_validate(
            {**run.cfg.mixture.model_dump(), **{k: v for k, v in given.items() if v is not None}}
        )
    except ValidationError as e:
        raise typer.BadParameter(describe(e)) from None
    report = train_mixture(run, cfg)
    work = work_dir(run, cfg)
    suffix = "mixture" if cfg.routing == "latent" else "routed"
    artifact = run.export(work, REPORT, name=f"{run.cfg.export.name}-{suffix}")
    evaluation = run.evaluate(work, REPORT)
    _echo({"artifact": str(artifact), "fit": report["fit"], "held_out": report["held_out"],
           "eval": {k: evaluation.get(k) for k in ("accuracy", "n", "groups")}})  # fmt: skip


@app.command()
def finetune(
    config: Config,
    out: Out = None,
    lora: Annotated[
        bool | None, typer.Option("--lora/--full", help="LoRA adapters or the full backbone")
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Train the backbone end to end with K heads (masked MSE on ratings + Bradley–Terry on labelled pairs),
    then export through the same path as the frozen pipeline. Writes OUT/finetune/{backbone,heads,artifact}.
    """
    from polyreward.models.torch.export import ExportOptions, export_artifact
    from polyreward.training.finetune import finetune as run_finetune

    run = _run(config, out, quiet)
    cfg = run.cfg.finetune if lora is None else run.cfg.finetune.model_copy(update={"lora": lora})
    backbone, heads, metrics = run_finetune(
        run.backbone,
        run.examples,
        run.objectives_for_finetune(),
        run.out / "finetune",
        cfg,
        progress=run.progress,
    )
    options = ExportOptions(
        precisions=run.cfg.export.precisions, name=f"{run.cfg.export.name}-finetuned",
        max_length=metrics["max_length"], overwrite=True, metrics={"finetune": metrics},
    )  # fmt: skip
    export_artifact(backbone, heads, run.out / "finetune" / "artifact", options)
    _echo(metrics)


def evaluate_command(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    data: Annotated[
        list[Path],
        typer.Option(
            help="canonical pairs / ratings / best-of-N JSONL, or a training config (its held-out splits); repeatable"
        ),
    ],
    precision: Annotated[PrecisionChoice, typer.Option(help="the graph to evaluate")] = PrecisionChoice.fp32,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
    rules: RulesOption = None,
) -> None:
    """Evaluate an artifact with its ONNX graph; writes report.json and PNG plots next to it.

    Reports pairwise accuracy overall and per subset, per-objective Pearson/Spearman/MSE on rated responses,
    best-of-N accuracy, calibration (ECE of P(chosen ≻ rejected)), length bias and gating weights by subset,
    worst-group accuracy, a mixture's groups against the hidden label (ARI) and the few-shot adaptation curve;
    with --rules, each rule objective's mean and how often it prefers the chosen reply.
    """
    from polyreward.training.data import read_canonical
    from polyreward.training.data.examples import Examples
    from polyreward.training.evaluate import evaluate

    examples, scales = Examples(), {}
    for path in data:
        if path.suffix in (".yaml", ".yml"):
            from polyreward.training.config import load_config
            from polyreward.training.pipeline import Run

            run = Run(load_config(path), progress=False)
            examples.extend(run.examples.where("test"))
            scales.update(run.scales())
        else:
            examples.extend(read_canonical(path))
    from polyreward.models.runtime.rules import RuleSet

    checks = RuleSet.load(rules)
    try:
        report = evaluate(
            artifact, examples, precision=precision.value, scales=scales, progress=sys.stderr.isatty(),
            rules=checks,
        )  # fmt: skip
    finally:
        checks.close()
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(
            f"pairwise accuracy {report['accuracy']} on {report['n']} pairs; report: {artifact / 'report.json'}"
        )
