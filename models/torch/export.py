"""Export a backbone plus reward heads into an artifact: ONE ONNX graph per precision.

Each graph runs backbone → pooling → regression → gating → transform and outputs `rewards [N,K]`,
`gating [N,K]` and `score [N]` (and `uncertainty [N,K]` for heads that carry it). The stages live apart:
`trace` (PyTorch → ONNX), `ort_passes` (fusion, int8, fp16), `verify` (ONNX against PyTorch); this module
writes the artifact directory and its manifest. Measured facts this follows (README, "Measured on this machine"): int8 is
dynamic per-channel quantization (per-tensor loses too much rank correlation); fp16 is for the CUDA provider.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import onnx
import torch

from polyreward.models import __version__
from polyreward.models.runtime.artifact import HEADS_FILE, TOKENIZER_DIR, finalize_manifest, staged_directory
from polyreward.models.runtime.builder import Kind, input_policy
from polyreward.models.runtime.files import sha256_file
from polyreward.models.runtime.manifest import (
    PRECISIONS,
    BackboneInfo,
    CalibrationStat,
    HeadInfo,
    InputPolicy,
    Manifest,
    ObjectiveUncertainty,
    Precision,
    Truncation,
)
from polyreward.models.torch.attention import CHUNK
from polyreward.models.torch.heads import load_heads, save_heads
from polyreward.models.torch.ort_passes import convert_fp16, fuse, quantize_dynamic_int8, quantize_int8
from polyreward.models.torch.reward_model import RewardModel, build_reward_model, detect_kind, load_backbone
from polyreward.models.torch.trace import OPSET, export_onnx, release, store_transposed, trace_example
from polyreward.models.torch.verify import ExportError, check_against_torch, graph_entry, run_torch

__all__ = ["GRAPH_FILES", "ExportError", "ExportOptions", "export_artifact", "write_artifact"]

log = logging.getLogger("polyreward.export")

GRAPH_FILES: dict[Precision, str] = {
    "fp32": "model.onnx",
    "int8": "model.int8.onnx",
    "int8-dynamic": "model.int8-dynamic.onnx",
    "fp16": "model.fp16.onnx",
}


@dataclass(frozen=True)
class ExportOptions:
    """Everything an export is told, beside the model itself.

    precisions: the graphs wanted (`graphs`). max_length / truncation / padding_side: the input policy
    (defaults from the model: `polyreward.models.runtime.builder.input_policy`). exporter: torchscript (the form
    ORT fuses) or dynamo. attention_chunk: query tokens per step of decoders' attention (default
    `polyreward.models.torch.attention.CHUNK`; memory per layer ~ heads x chunk x length). fuse: ORT transformer
    fusion for BERT-like encoders. name (default: the output directory's name), version, calibration (raw and
    debiased; group_calibration: a mixture's group scores), uncertainty (residual variances and conformal
    multipliers; without it predictive = epistemic), metrics and provenance (merged into the exporter's own) go
    into the manifest as given. The transform T always comes from the heads.
    """

    precisions: Sequence[Precision] = ("fp32", "int8")
    name: str | None = None
    max_length: int | None = None
    truncation: Truncation = "left"
    padding_side: Literal["left", "right"] | None = None
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    attention_chunk: int | None = None
    fuse: bool = True
    overwrite: bool = False
    version: str | None = None
    calibration: dict[str, CalibrationStat] | None = None
    debiased_calibration: dict[str, CalibrationStat] | None = None
    group_calibration: dict[str, CalibrationStat] | None = None
    uncertainty: dict[str, ObjectiveUncertainty] | None = None
    metrics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    def graphs(self, kind: Kind) -> list[Precision]:
        """The graphs to write, in build order. fp32 is always built (int8, and fp16 for encoders, derive from
        it) except for a decoder wanted in fp16 only, which is traced in fp16 directly."""
        unknown = set(self.precisions) - set(PRECISIONS)
        if unknown:
            raise ExportError(f"--precision: unknown {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")
        if kind == "decoder" and set(self.precisions) == {"fp16"}:
            return ["fp16"]
        return [p for p in PRECISIONS if p in {"fp32", *self.precisions}]

    def load_dtype(self, kind: Kind) -> torch.dtype:
        """The dtype to load a backbone in: fp16 when fp16 is all that is built (no fp32 copy ever exists)."""
        return torch.float16 if self.graphs(kind) == ["fp16"] else torch.float32


def export_artifact(
    backbone_dir: str | os.PathLike,
    heads_file: str | os.PathLike,
    out: str | os.PathLike,
    options: ExportOptions | None = None,
) -> Manifest:
    """Build an artifact directory at `out` (written atomically) from a backbone directory and a heads file."""
    from transformers import AutoConfig

    options = options or ExportOptions()
    kind = detect_kind(AutoConfig.from_pretrained(backbone_dir))
    if kind == "encoder" and options.padding_side == "left":
        raise ExportError(
            "--padding-side left: encoders must be right-padded (absolute positions, and ORT's fused Attention "
            "reads the mask as per-row lengths)"
        )
    t0 = time.perf_counter()
    config, backbone, tokenizer = load_backbone(backbone_dir, dtype=options.load_dtype(kind))
    model = build_reward_model(backbone, load_heads(heads_file), kind)
    del backbone  # write_artifact releases the weights once traced; no other reference may keep them
    policy = input_policy(
        config, tokenizer, kind, max_length=options.max_length, truncation=options.truncation,
        padding_side=options.padding_side,
    )  # fmt: skip
    log.info(
        "loaded %s backbone %s (%s) in %.1fs", kind, backbone_dir, config.model_type, time.perf_counter() - t0
    )
    options = replace(
        options, provenance={**options.provenance, "heads_sha256": sha256_file(Path(heads_file))}
    )
    return write_artifact(
        model, config, tokenizer, policy, out, options, backbone_id=str(Path(backbone_dir).resolve())
    )


def write_artifact(
    model: RewardModel,
    config,
    tokenizer,
    policy: InputPolicy,
    out: str | os.PathLike,
    options: ExportOptions,
    *,
    backbone_id: str,
) -> Manifest:
    """Write an artifact for a PyTorch reward model. Consumes `model`: its backbone weights are released after
    the last trace, so a large model is not held twice in memory.

    fp32 is traced from the model; decoders' fp16 is traced from the same model cast to half precision (heads
    stay float32), which needs no fp32 graph and works for models of any size; encoders' fp16 is converted
    from the fused fp32 graph. int8 is quantized from fp32.
    """
    t0 = time.perf_counter()
    kind = model.kind
    wanted = options.graphs(kind)
    with staged_directory(Path(out), options.overwrite) as tmp:
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        save_heads(model.heads, tmp / HEADS_FILE)
        fused_ops = _trace_graphs(model, config, trace_example(tokenizer, kind, policy), tmp, wanted, options)
        for precision in wanted:
            if precision == "int8":
                quantize_int8(tmp / GRAPH_FILES["fp32"], tmp / GRAPH_FILES["int8"])
            elif precision == "int8-dynamic":
                quantize_dynamic_int8(tmp / GRAPH_FILES["fp32"], tmp / GRAPH_FILES["int8-dynamic"])
            elif precision == "fp16" and kind == "encoder":
                convert_fp16(tmp / GRAPH_FILES["fp32"], tmp / GRAPH_FILES["fp16"])
        graphs = {p: graph_entry(tmp / GRAPH_FILES[p], fused=bool(fused_ops)) for p in wanted}
        provenance = {**options.provenance, **_provenance(options.exporter, fused_ops)}
        if kind == "decoder":
            provenance["attention_chunk"] = options.attention_chunk or CHUNK
        manifest = _manifest(model, config, policy, graphs, options, Path(out).name, backbone_id, provenance)
        manifest = finalize_manifest(tmp, manifest)
    log.info("wrote %s (%s) in %.1fs", out, ", ".join(wanted), time.perf_counter() - t0)
    return manifest


def _trace_graphs(
    model: RewardModel, config, example, tmp: Path, wanted, options: ExportOptions
) -> dict[str, int]:
    """Trace fp32 (and decoders' fp16) into `tmp`, each checked against PyTorch; returns the fused-op counts."""
    kind, input_names = model.kind, model.input_names()
    traced = [p for p in wanted if p == "fp32" or (p == "fp16" and kind == "decoder")]
    if kind == "decoder":
        store_transposed(model.backbone)
    fused_ops: dict[str, int] = {}
    for i, precision in enumerate(traced):
        path = tmp / GRAPH_FILES[precision]
        model.backbone.to(torch.float16 if precision == "fp16" else torch.float32)
        want = run_torch(model, example, input_names)
        export_onnx(model, example, input_names, path, options.exporter, options.attention_chunk)
        if i == len(traced) - 1:
            release(model.backbone)
        if options.fuse and kind == "encoder":
            fused_ops = fuse(path, config)
        check_against_torch(want, example, path, fp16=precision == "fp16")
    return fused_ops


def _manifest(
    model: RewardModel, config, policy: InputPolicy, graphs, options: ExportOptions, default_name: str,
    backbone_id: str, provenance: dict,
) -> Manifest:  # fmt: skip
    heads = model.heads.cfg
    gating = heads.gating
    return Manifest(
        name=options.name or default_name,
        backbone=BackboneInfo(
            id=backbone_id, kind=model.kind, model_type=config.model_type, hidden_size=config.hidden_size,
            pooling="mean" if model.kind == "encoder" else "last",
        ),
        objectives=heads.objectives,
        head=HeadInfo(
            kind=heads.kind,
            gating_temperature=gating.temperature if gating else None,
            gating_hidden_dim=gating.hidden_dim if gating else None,
            gating_n_hidden=gating.n_hidden if gating else None,
            groups=heads.mixture.groups if heads.mixture else None,
            routing=heads.mixture.routing if heads.mixture else None,
            group_calibration=options.group_calibration,
        ),
        input=policy,
        graphs=graphs,
        calibration=options.calibration,
        debiased_calibration=options.debiased_calibration,
        transform=model.heads.transform.detach().double().cpu().tolist(),
        uncertainty=options.uncertainty,
        metrics=options.metrics,
        provenance=provenance,
        **({"version": options.version} if options.version else {}),
    )  # fmt: skip


def _provenance(exporter: str, fused_ops: dict[str, int]) -> dict:
    import onnxruntime
    import transformers

    return {
        "polyreward": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "exporter": exporter,
        "opset": OPSET,
        "fused_ops": fused_ops,
    }
