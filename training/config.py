"""The training configuration: one YAML file drives featurize → stage 1 → stage 2 → export → eval.

Every section is a pydantic model with `extra="forbid"`, so a misspelt option fails at load time naming it,
before any data is read or any model runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from polyreward.models.runtime.errors import PolyrewardError, describe, field_names
from polyreward.models.runtime.manifest import Precision
from polyreward.training.data import DatasetSpec, load_specs
from polyreward.training.finetune import FinetuneConfig
from polyreward.training.mixture import MixtureTrainConfig
from polyreward.training.stage2 import Stage2Config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeaturizeConfig(_Strict):
    engine: Literal["onnx", "torch"] = Field(
        "onnx", description="onnx: the fused backbone graph in ONNX Runtime (fast); torch: eager PyTorch"
    )
    device: Literal["cpu", "cuda"] = "cpu"
    max_length: int | None = Field(None, ge=8, description="tokens per sequence [default: the model's limit]")
    token_budget: int = Field(16384, ge=64, description="padded tokens per batch")
    max_items: int = Field(64, ge=1, description="sequences per batch")
    shard_items: int = Field(
        2048, ge=1, description="sequences per cache shard (the unit a killed run loses)"
    )


class Stage1Config(_Strict):
    validation: float = Field(0.2, gt=0, lt=1, description="fraction of training rows used to pick alpha")
    uncertainty_rank: int = Field(64, ge=1, description="rank of the stored posterior factors")
    verbosity: bool = Field(True, description="add a 'verbosity' objective fitted to response length")
    normalize: bool = Field(
        True, description="fit on L2-normalized embeddings (the heads then normalize too, in the graph)"
    )


class ExportConfig(_Strict):
    precisions: list[Precision] = Field(default_factory=lambda: ["fp32", "int8"])
    name: str | None = Field(None, description="model name [default: the config file's stem]")
    version: str = "0.1.0"


class EvalConfig(_Strict):
    precision: Precision = "fp32"


class TrainConfig(_Strict):
    backbone: str | None = Field(None, description="Hugging Face model directory [default: bundled MiniLM]")
    out: str = Field("build/train", description="work directory (relative to the config file)")
    cache_dir: str | None = Field(None, description="embedding cache [default: OUT/features]")
    datasets: list[DatasetSpec]
    descriptions: dict[str, str] = Field(default_factory=dict, description="objective -> description")
    featurize: FeaturizeConfig = Field(default_factory=FeaturizeConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    mixture: MixtureTrainConfig = Field(default_factory=MixtureTrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    # Where the config file lives: relative paths in it are resolved against this.
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr("config")

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def source(self) -> str:
        return self._source

    def resolve(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self._base_dir / p

    @property
    def out_dir(self) -> Path:
        return self.resolve(self.out)


class ConfigError(PolyrewardError, ValueError):
    """A configuration file that cannot be used; the message names the file and option."""


def load_config(path: str | os.PathLike, *, out: str | None = None) -> TrainConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    raw = dict(raw)
    if not isinstance(raw.get("datasets"), list) or not raw["datasets"]:
        raise ConfigError(f"{path}: datasets: a non-empty list is required")
    specs = load_specs(raw.pop("datasets"), str(path))
    try:
        cfg = TrainConfig.model_validate({**raw, "datasets": []})
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe(e, known=field_names(TrainConfig))}") from None
    cfg.datasets = specs
    cfg._base_dir = path.resolve().parent
    cfg._source = str(path)
    if out is not None:
        cfg.out = str(Path(out).resolve())
    if cfg.export.name is None:
        cfg.export.name = path.stem
    return cfg
