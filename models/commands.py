"""The model commands: `polyreward export`, `import-armorm`, `import-hf` and `check-parity` (registered as entry points).

Each needs the `train` extra (torch); imports of the torch side happen inside the commands, so `--help` and
the rest of the CLI stay fast and work on a serving install.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from polyreward.models.cli import DeviceChoice, default_is
from polyreward.models.runtime.manifest import PRECISIONS, Manifest

Out = Annotated[Path, typer.Option(help="artifact directory to create")]
Overwrite = Annotated[bool, typer.Option(help="replace --out if it exists")]
ImportPrecision = Annotated[
    str,
    typer.Option(
        help="comma-separated graphs: fp16 (GPU serving; traced in half precision, no fp32 copy), "
        "fp32 (CPU, exact), int8, int8-dynamic"
    ),
]
AttentionChunk = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="decoders: query tokens per step of the attention loop (memory per layer ~ heads x chunk x "
        "length)" + default_is("256"),
    ),
]
CheckpointName = Annotated[
    str | None, typer.Option(help="model name" + default_is("the checkpoint directory name"))
]


class Exporter(str, Enum):
    torchscript = "torchscript"
    dynamo = "dynamo"


class PaddingSide(str, Enum):
    left = "left"
    right = "right"


class TruncationMode(str, Enum):
    left = "left"
    error = "error"


def precisions(value: str) -> list[str]:
    """A comma-separated list of graph precisions, checked."""
    chosen = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in chosen if p not in PRECISIONS]
    if bad or not chosen:
        raise typer.BadParameter(f"unknown precision {bad}; choose from {', '.join(PRECISIONS)}")
    return chosen


def export(
    out: Out,
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
        typer.Option(help="Hugging Face model directory" + default_is("the bundled all-MiniLM-L6-v2")),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            help="comma-separated graphs to build: fp32 (always, except fp16 alone for a decoder), int8 (CPU, "
            "batch-invariant), int8-dynamic (CPU, faster, scores depend on the batch), fp16 (GPU)"
        ),
    ] = "fp32,int8",
    max_length: Annotated[
        int | None, typer.Option(help="tokens per sequence" + default_is("the model's limit"))
    ] = None,
    padding_side: Annotated[
        PaddingSide | None,
        typer.Option(help="batch padding" + default_is("right for encoders, left for decoders")),
    ] = None,
    truncation: Annotated[
        TruncationMode,
        typer.Option(help="over-long items: left drops the oldest tokens first; error refuses them"),
    ] = TruncationMode.left,
    exporter: Annotated[
        Exporter, typer.Option(help="torchscript: the form ORT fuses; dynamo: the fallback")
    ] = (Exporter.torchscript),
    fuse: Annotated[bool, typer.Option(help="ORT transformer fusion for BERT-like encoders")] = True,
    attention_chunk: AttentionChunk = None,
    name: Annotated[
        str | None, typer.Option(help="model name" + default_is("the --out directory name"))
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Export backbone + heads as an artifact: one ONNX graph per precision, tokenizer, manifest."""
    from polyreward.models.default import default_backbone, default_model
    from polyreward.models.torch.export import ExportOptions, export_artifact

    shipped: dict = {}
    if default:
        if heads is not None:
            raise typer.BadParameter("give either --heads or --default, not both", param_hint="--heads")
        heads, shipped = default_model()
    elif heads is None:
        raise typer.BadParameter(
            "--heads is required (or --default for the shipped model)", param_hint="--heads"
        )
    given = {"name": name, "max_length": max_length}
    options = ExportOptions(
        precisions=precisions(precision),  # type: ignore[arg-type]
        truncation=truncation.value,
        padding_side=padding_side.value if padding_side else None,
        exporter=exporter.value,
        attention_chunk=attention_chunk,
        fuse=fuse,
        overwrite=overwrite,
        **(shipped | {k: v for k, v in given.items() if v is not None}),
    )
    report_sizes(out, export_artifact(backbone or default_backbone(), heads, out, options))


def report_sizes(out: Path, manifest: Manifest) -> None:
    sizes = {
        p: sum(manifest.files[f].size for f in [g.file, *g.data_files]) / 1e6
        for p, g in manifest.graphs.items()
    }
    typer.echo(f"wrote {out}: " + ", ".join(f"{p} {mb:.1f} MB" for p, mb in sizes.items()), err=True)


def import_armorm(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="local ArmoRM checkpoint (Hugging Face layout, safetensors, e.g. a hub snapshot)"
        ),
    ],
    out: Out,
    precision: ImportPrecision = "fp32",
    max_length: Annotated[
        int | None, typer.Option(help="tokens per conversation" + default_is("the model's context, 8192"))
    ] = None,
    name: CheckpointName = None,
    attention_chunk: AttentionChunk = None,
    overwrite: Overwrite = False,
) -> None:
    """Import RLHFlow/ArmoRM-Llama3-8B-v0.1 (or a checkpoint in its layout) without trust_remote_code.

    The artifact computes what the official code computes: 19 objective rewards at the last token, gating
    weights at the <|eot_id|> that opens the final assistant header, and the transformed, gated score.
    """
    from polyreward.models.torch.armorm import import_armorm as run_import
    from polyreward.models.torch.export import ExportOptions

    options = ExportOptions(
        precisions=precisions(precision),
        name=name,
        max_length=max_length,
        attention_chunk=attention_chunk,
        overwrite=overwrite,  # type: ignore[arg-type]
    )
    report_sizes(out, run_import(checkpoint, out, options))


def import_hf(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="local *ForSequenceClassification checkpoint (Hugging Face layout, safetensors), e.g. a hub "
            "snapshot of Skywork/Skywork-Reward-V2-Llama-3.1-8B"
        ),
    ],
    out: Out,
    objective: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="objective name per label, in label order (repeat for several)"
            + default_is("config.json's id2label; one generic LABEL_0 becomes 'reward'"),
        ),
    ] = None,
    precision: ImportPrecision = "fp32",
    max_length: Annotated[
        int | None,
        typer.Option(help="tokens per conversation" + default_is("the model's context, at most 16384")),
    ] = None,
    padding_side: Annotated[
        PaddingSide | None, typer.Option(help="how batches are padded" + default_is("left"))
    ] = None,
    name: CheckpointName = None,
    attention_chunk: AttentionChunk = None,
    overwrite: Overwrite = False,
) -> None:
    """Import a Hugging Face reward model (Llama, Mistral, Qwen2, Qwen3, Gemma2 *ForSequenceClassification)
    without trust_remote_code.

    Each label becomes an objective: its reward is the checkpoint's logit for that label at the last real
    token, rendered with the checkpoint's own chat template; the score is the mean of the labels' rewards
    (one label: the logit itself).
    """
    from polyreward.models.torch.export import ExportOptions
    from polyreward.models.torch.hf_import import import_hf as run_import

    options = ExportOptions(
        precisions=precisions(precision),  # type: ignore[arg-type]
        name=name,
        max_length=max_length,
        padding_side=padding_side.value if padding_side else None,
        attention_chunk=attention_chunk,
        overwrite=overwrite,
    )
    report_sizes(out, run_import(checkpoint, out, options, objectives=objective or None))


def check_parity(
    artifact: Annotated[Path, typer.Argument(help="artifact directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    input: Annotated[
        Path | None, typer.Option(help="JSONL items to compare on" + default_is("40 packaged conversations"))
    ] = None,
    backbone: Annotated[
        Path | None, typer.Option(help="backbone directory" + default_is("from the manifest"))
    ] = None,
    device: Annotated[DeviceChoice, typer.Option(help="the ONNX side's device")] = DeviceChoice.cpu,
) -> None:
    """Compare every ONNX graph with the PyTorch model; exit 1 if a variant fails its release gate."""
    from polyreward.models.runtime.items import read_items_jsonl
    from polyreward.models.torch.parity import check_parity as run_check

    items = read_items_jsonl(input)[0] if input else None
    report = run_check(artifact, items=items, backbone=backbone, device=device.value)
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
