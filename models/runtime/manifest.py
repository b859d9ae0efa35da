"""The artifact manifest: a versioned, self-describing record of everything a scorer needs.

A reader refuses any schema version it does not know (see `polyreward.models.runtime.artifact.load_manifest`), so an old
polyreward never misreads a newer artifact. Bump `SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from polyreward.models.runtime.objectives import Objective, check_objectives

# 2 added input.gating_marker (an old reader must not serve such an artifact with the wrong gating position).
# 3 added transform (the debiased space) and uncertainty (residual variances, conformal multipliers).
# 4 added mixture heads (head.kind "mixture", head.groups, head.routing, head.group_calibration; the group_*
# graph outputs).
# An artifact records the lowest version that describes it (`Manifest.schema_version`), so a reader of 3 keeps
# serving the artifacts without mixture heads.
SCHEMA_VERSION = 4
SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3, 4)
CONFORMAL_LEVELS = tuple(round(0.01 * i, 2) for i in range(1, 100))

# int8: per-row activation scales, batch-invariant; int8-dynamic: ONNX Runtime's dynamic quantization, one
# activation scale per tensor (faster on a CPU, but an item's score depends on what it is batched with).
Precision = Literal["fp32", "int8", "int8-dynamic", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "int8", "int8-dynamic", "fp16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneInfo(_Strict):
    id: str = Field(
        description="where the backbone came from: a hub id or the directory it was exported from"
    )
    kind: Literal["encoder", "decoder"]
    model_type: str = Field(description="transformers model_type, e.g. 'bert', 'llama'")
    hidden_size: int
    pooling: Literal["mean", "last"] = Field(
        description="mean: masked mean over tokens (encoders); last: hidden state at a token position (decoders)"
    )


GROUP_FIELDS = ("groups", "routing", "group_calibration")


class CalibrationStat(_Strict):
    mean: float
    std: float


class HeadInfo(_Strict):
    kind: Literal["moe", "fixed", "mixture"] = Field(
        description="moe: prompt-conditioned gating; fixed: constant weights; mixture: groups, each a weighting "
        "of the debiased objectives, mixed by a router on the prompt"
    )
    gating_temperature: float | None = None
    gating_hidden_dim: int | None = None
    gating_n_hidden: int | None = None
    groups: list[str] | None = Field(
        None, description="mixture heads: the groups, in the order of group_* outputs"
    )
    routing: Literal["latent", "category"] | None = Field(
        None, description="mixture heads: latent preference groups, or one group per task category"
    )
    group_calibration: dict[str, CalibrationStat] | None = Field(
        None,
        description="mixture heads: each group score's mean and std on the training responses; worst_group "
        "compares the groups' standardized scores (without them: the raw scores)",
    )

    @model_validator(mode="after")
    def _groups(self) -> HeadInfo:
        if (self.kind == "mixture") != bool(self.groups):
            raise ValueError("head.groups: mixture heads name their groups, and only they have groups")
        if self.groups and len(set(self.groups)) != len(self.groups):
            raise ValueError(f"head.groups: names must be distinct: {self.groups}")
        stats = self.group_calibration
        if stats is not None and (
            set(stats) != set(self.groups or ()) or min(c.std for c in stats.values()) <= 0
        ):
            raise ValueError(
                "head.group_calibration: one mean and positive std per group, named as in head.groups"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_groups(self, handler) -> dict:  # heads without groups are written as before version 4
        out = handler(self)
        return out if self.groups else {k: v for k, v in out.items() if k not in GROUP_FIELDS}


Truncation = Literal["left", "error"]


class InputPolicy(_Strict):
    template: Literal["chat", "plain"] = Field(
        description="chat: the tokenizer's chat template; plain: 'Role: content' turns joined by blank lines"
    )
    max_length: int = Field(ge=8, description="tokens per sequence; longer inputs are truncated or refused")
    truncation: Truncation = Field(
        "left",
        description="left: drop the oldest prompt tokens, then the start of the response; error: refuse",
    )
    padding_side: Literal["left", "right"] = "right"
    gating_marker: str | None = Field(
        None,
        description="decoders: read the gating embedding at the first token of the LAST occurrence of this "
        "text's tokens and refuse items without it (ArmoRM: '<|eot_id|><|start_header_id|>assistant"
        "<|end_header_id|>\\n\\n'); None: at the last token of the prompt part",
    )


class ObjectiveUncertainty(_Strict):
    """What turns an objective's epistemic standard deviation (a graph output) into predictive ones and
    intervals (README, "Uncertainty")."""

    residual_variance: float = Field(
        0.0, ge=0, description="s²: the label noise a ridge head leaves; predictive σ² = epistemic σ² + s²"
    )
    conformal: list[float] | None = Field(
        None,
        description="split-conformal multipliers q(l) of the predictive σ for the levels l = 0.01 … 0.99: "
        "the ⌈(n+1)·l⌉-th smallest |y − ŷ| / σ over n calibration rows (prompts held out of the fit that "
        "predicts them); levels above n/(n+1) get the largest",
    )
    conformal_n: int | None = Field(None, ge=1, description="calibration rows behind `conformal`")

    @model_validator(mode="after")
    def _levels(self) -> ObjectiveUncertainty:
        if self.conformal is not None and len(self.conformal) != len(CONFORMAL_LEVELS):
            raise ValueError(f"conformal: {len(CONFORMAL_LEVELS)} multipliers expected, one per level")
        return self


class FileEntry(_Strict):
    sha256: str
    size: int


class GraphEntry(_Strict):
    file: str
    data_files: list[str] = Field(default_factory=list, description="ONNX external-data files, if any")
    inputs: list[str]
    outputs: list[str]
    fused: bool = False


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = "0.1.0"
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    backbone: BackboneInfo
    objectives: list[Objective]
    head: HeadInfo
    input: InputPolicy
    calibration: dict[str, CalibrationStat] | None = Field(
        None, description="raw rewards' mean and std on the training responses (for normalize)"
    )
    debiased_calibration: dict[str, CalibrationStat] | None = Field(
        None, description="the same for the debiased objectives rewards @ T"
    )
    transform: list[list[float]] | None = Field(
        None,
        description="the K×K matrix T of the debiased space (rewards @ T), as in the graph; None: not recorded "
        "(artifacts before schema 3), so only the raw space is served",
    )
    uncertainty: dict[str, ObjectiveUncertainty] | None = None
    graphs: dict[Precision, GraphEntry]
    files: dict[str, FileEntry] = Field(
        default_factory=dict, description="relative path -> checksum and size"
    )
    provenance: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        check_objectives(self.objectives)
        if "schema_version" not in self.model_fields_set and self.head.kind != "mixture":
            self.schema_version = 3  # the lowest version that describes it (see SCHEMA_VERSION)
        if self.head.kind == "mixture" and self.schema_version < 4:
            raise ValueError("schema_version: mixture heads need schema 4")
        if self.backbone.kind == "encoder" and self.input.padding_side == "left":
            # ORT's fused Attention reads the mask as per-row lengths (ReduceSum), which assumes right padding.
            raise ValueError("input.padding_side: encoders must be right-padded")
        if self.backbone.kind == "encoder" and self.input.gating_marker is not None:
            raise ValueError("input.gating_marker: only decoders read the gating embedding at a token")
        if not self.graphs:
            raise ValueError("graphs: an artifact needs at least one ONNX graph")
        for precision, graph in self.graphs.items():
            for f in [graph.file, *graph.data_files]:
                if self.files and f not in self.files:
                    raise ValueError(f"graphs.{precision}: file {f!r} is not listed in files")
        names = set(self.objective_names)
        for field in ("calibration", "debiased_calibration", "uncertainty"):
            unknown = set(getattr(self, field) or ()) - names
            if unknown:
                raise ValueError(f"{field}: unknown objectives {sorted(unknown)}")
        k = len(names)
        if self.transform is not None and (
            len(self.transform) != k or any(len(r) != k for r in self.transform)
        ):
            raise ValueError(f"transform: must be {k}×{k} (one row and column per objective)")
        return self

    @property
    def objective_names(self) -> list[str]:
        return [o.name for o in self.objectives]
