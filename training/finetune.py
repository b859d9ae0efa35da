"""Multi-head fine-tuning: the backbone (LoRA or full) and K linear reward heads, trained together.

Stage 1 fits heads on a frozen backbone; when its embeddings do not carry an objective, the backbone itself
has to move. This trains it end to end on the "train" split: masked MSE on absolute ratings (scaled to [0, 1])
plus Bradley–Terry on pairs labelled with one objective.

Every reward is computed by the very wrapper that is exported (`build_reward_model`), on inputs from the one
input builder (`InputBuilder.build` + `collate` under `input_policy`), so the model trained here is the
model the ONNX graph runs. The result is a plain backbone directory (LoRA merged in) and a fixed-weights heads
file; `polyreward.models.torch.export.export_artifact(backbone_dir, heads_file, ...)` turns them into an artifact (pass it the
`max_length` reported in the metrics, so serving truncates as training did).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from polyreward.models.runtime.artifact import HEADS_FILE
from polyreward.models.runtime.batching import plan_batches
from polyreward.models.runtime.builder import Encoded, InputBuilder, input_policy
from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.objectives import Objective, check_objectives
from polyreward.models.torch.heads import HeadsConfig, RewardHeads, save_heads
from polyreward.models.torch.reward_model import (
    RewardModel,
    build_reward_model,
    detect_kind,
    load_backbone,
    score_torch,
    torch_inputs,
)
from polyreward.training.data.examples import Examples, scale_label

BACKBONE_DIR = "backbone"
# Gradient-norm clip: one odd batch (a long, badly rated item) must not undo what the others taught.
_MAX_GRAD_NORM = 1.0


class FinetuneError(PolyrewardError, ValueError):
    """Fine-tuning cannot start: a bad objective spec, or no training example labels any objective."""


class FinetuneConfig(BaseModel):
    """How to fine-tune. Learning rates differ because fresh heads need far larger steps than a backbone."""

    model_config = ConfigDict(extra="forbid")
    lora: bool = Field(True, description="train LoRA adapters (merged afterwards) instead of every weight")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: int = Field(
        16, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r)"
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="modules to adapt; None: peft's defaults for the architecture, else every Linear layer "
        "inside an attention block",
    )
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="when set, overrides epochs (the data is cycled)")
    lr: float = Field(2e-5, gt=0, description="backbone (or LoRA) learning rate")
    head_lr: float = Field(1e-3, gt=0, description="reward heads learning rate")
    batch_size: int = Field(16, ge=2, description="items per step; a pair counts as 2 and is never split")
    pair_weight: float = Field(1.0, ge=0)
    rating_weight: float = Field(1.0, ge=0)
    seed: int = 0
    max_length: int | None = Field(None, ge=8, description="token limit; None: the backbone's own")
    device: str = "cpu"


@dataclass(frozen=True)
class TrainingData:
    """The training split as model inputs. Rows of `encoded`: the R rated items first, then the chosen and
    rejected item of each of the P pairs (rows R + 2p and R + 2p + 1), so one layout serves a batch and the
    whole set alike."""

    encoded: list[Encoded]
    labels: torch.Tensor  # [R, K] float32, scaled to [0, 1]; NaN where an item does not rate an objective
    pair_objective: torch.Tensor  # [P] int64: the objective column each pair expresses

    @property
    def n_rated(self) -> int:
        return self.labels.shape[0]

    @property
    def n_pairs(self) -> int:
        return self.pair_objective.shape[0]

    def select(
        self, rated: Sequence[int], pairs: Sequence[int]
    ) -> tuple[list[Encoded], torch.Tensor, torch.Tensor]:
        """(items, labels, pair objectives) of a subset, in the same rated-then-pairs layout."""
        r = self.n_rated
        rows = [*rated, *(row for p in pairs for row in (r + 2 * p, r + 2 * p + 1))]
        index = torch.as_tensor(list(rated), dtype=torch.long)
        return (
            [self.encoded[i] for i in rows],
            self.labels[index],
            self.pair_objective[torch.as_tensor(list(pairs), dtype=torch.long)],
        )


def training_data(examples: Examples, objectives: Sequence[Objective], builder: InputBuilder) -> TrainingData:
    """Encode the "train" split: ratings of at least one objective, and non-tie pairs naming an objective.

    Ratings are matched to objectives by name and scaled with each objective's `scale`; ratings of other
    objectives, ties, and pairs with no or an unknown objective carry no signal for these heads and are skipped.
    """
    columns = {o.name: k for k, o in enumerate(objectives)}
    train = examples.where("train")
    rows, rated_items = [], []
    for e in train.ratings:
        row = [scale_label(e.rating(o.name), o.scale) for o in objectives]
        if not all(math.isnan(v) for v in row):
            rows.append(row)
            rated_items.append(e.item)
    pairs = [p for p in train.pairs if not p.tie and p.objective in columns]
    if not rows and not pairs:
        raise FinetuneError(
            f"nothing to train on: the 'train' split has {len(train.ratings)} rating examples and "
            f"{len(train.pairs)} pairs, but none rates or prefers by any of the objectives {list(columns)}"
        )
    items = rated_items + [item for p in pairs for item in p.items]
    return TrainingData(
        encoded=builder.build(items),
        labels=torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(objectives)),
        pair_objective=torch.tensor([columns[p.objective] for p in pairs], dtype=torch.long),
    )


def init_heads(objectives: Sequence[Objective], hidden_size: int, data: TrainingData) -> RewardHeads:
    """Fixed-weights heads that start as the mean predictor: zero weights, bias = each objective's label mean.

    Starting from the mean keeps the first steps from chasing a random head's errors into the backbone; an
    objective with only pairs starts at 0 (Bradley–Terry does not see a constant).
    """
    heads = RewardHeads(HeadsConfig(objectives=list(objectives), hidden_size=hidden_size, kind="fixed"))
    labels = data.labels
    observed = ~torch.isnan(labels)
    means = torch.nan_to_num(labels).sum(0) / observed.sum(0).clamp(min=1)
    with torch.no_grad():
        heads.regression.weight.zero_()
        heads.regression.bias.copy_(means)
    return heads


def prepare(
    backbone_dir: str | os.PathLike,
    examples: Examples,
    objectives: Sequence[Objective],
    cfg: FinetuneConfig,
) -> tuple[RewardModel, InputBuilder, TrainingData]:
    """The untrained starting point: (backbone + initial heads, input builder, encoded training split).

    `finetune` starts here; it is public so the loss before training can be measured on the same footing.
    """
    check_objectives(list(objectives))
    config, backbone, tokenizer = load_backbone(backbone_dir)
    kind = detect_kind(config)
    builder = InputBuilder(tokenizer, kind, input_policy(config, tokenizer, kind, max_length=cfg.max_length))
    data = training_data(examples, objectives, builder)
    heads = init_heads(objectives, config.hidden_size, data)
    return build_reward_model(backbone, heads, kind), builder, data


def lora_target_modules(backbone: nn.Module, requested: list[str] | None = None) -> list[str]:
    """The modules LoRA adapts: `requested`, else peft's defaults for the model type, else every Linear layer
    inside an attention block (peft only knows the architectures it lists; attention projections are where
    the LoRA paper put its adapters)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if requested:
        return list(requested)
    if backbone.config.model_type in DEFAULTS:
        return list(DEFAULTS[backbone.config.model_type])
    # Full names: a leaf name like "dense" would also match the MLP's layers.
    names = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear)
        and any("attn" in p or "attention" in p for p in name.lower().split("."))
    ]
    if not names:
        raise FinetuneError(
            f"target_modules: no Linear layer inside an attention block of this {backbone.config.model_type} "
            "backbone; name the modules to adapt"
        )
    return names


def _loss(
    rewards: torch.Tensor, labels: torch.Tensor, pair_objective: torch.Tensor, cfg: FinetuneConfig
) -> torch.Tensor:
    """rating_weight × masked MSE + pair_weight × Bradley–Terry, on rewards in the rated-then-pairs layout."""
    n_rated, n_pairs = labels.shape[0], pair_objective.shape[0]
    loss = rewards.new_zeros(())
    if n_rated:
        observed = ~torch.isnan(labels)
        err = rewards[:n_rated] - torch.nan_to_num(labels)
        loss = loss + cfg.rating_weight * err[observed].square().mean()
    if n_pairs:
        pair = rewards[n_rated:].view(n_pairs, 2, -1)
        k = pair_objective[:, None]
        margin = pair[:, 0].gather(1, k) - pair[:, 1].gather(1, k)
        loss = loss - cfg.pair_weight * F.logsigmoid(margin).mean()
    return loss


def dataset_loss(
    model: RewardModel,
    builder: InputBuilder,
    data: TrainingData,
    cfg: FinetuneConfig,
    *,
    token_budget: int = 16384,
    max_items: int = 64,
) -> float:
    """The training objective over the whole set at once (eval mode: no dropout), not a batch average.

    Rewards come from `score_torch` in length-sorted batches, exactly as the exported graph would score them.
    """
    encoded, labels, pair_objective = data.select(range(data.n_rated), range(data.n_pairs))
    rewards = np.zeros((len(encoded), len(model.heads.cfg.objectives)), np.float32)
    was_training = model.training
    model.eval()
    try:
        for batch in plan_batches([e.tokens for e in encoded], token_budget, max_items):
            out = score_torch(
                model,
                [encoded[i] for i in batch],
                pad_id=builder.pad_id,
                padding_side=builder.policy.padding_side,
            )
            rewards[batch] = out["rewards"]
    finally:
        model.train(was_training)
    return float(_loss(torch.from_numpy(rewards), labels, pair_objective, cfg))


def _schedule(data: TrainingData, cfg: FinetuneConfig) -> list[tuple[list[int], list[int]]]:
    """Every step's (rated rows, pair indices): `epochs` seeded shuffles, or as many as `max_steps` needs.

    Each epoch packs the shuffled examples into batches of at most `batch_size` items; a pair is never split.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    steps: list[tuple[list[int], list[int]]] = []
    epoch = 0
    while (epoch < cfg.epochs) if cfg.max_steps is None else (len(steps) < cfg.max_steps):
        rated: list[int] = []
        pairs: list[int] = []
        for unit in torch.randperm(data.n_rated + data.n_pairs, generator=generator).tolist():
            is_pair = unit >= data.n_rated
            if len(rated) + 2 * len(pairs) + (2 if is_pair else 1) > cfg.batch_size:
                steps.append((rated, pairs))
                rated, pairs = [], []
            if is_pair:
                pairs.append(unit - data.n_rated)
            else:
                rated.append(unit)
        steps.append((rated, pairs))
        epoch += 1
    return steps[: cfg.max_steps]


def finetune(
    backbone_dir: str | os.PathLike,
    examples: Examples,
    objectives: list[Objective],
    out_dir: Path,
    cfg: FinetuneConfig,
    *,
    progress: bool = True,
) -> tuple[Path, Path, dict]:
    """Train backbone and heads on the "train" split; write `out_dir/backbone` and `out_dir/heads.safetensors`.

    Returns (backbone directory, heads file, metrics): per-step training loss of the first and last step,
    steps, epochs, seconds, trainable and total parameter counts, how many ratings and pairs were used, and the
    `max_length` the inputs were built with (give the same to `export_artifact`).
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices and dropout
    model, builder, data = prepare(backbone_dir, examples, objectives, cfg)
    backbone = model.backbone
    peft_model = None
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = lora_target_modules(backbone, cfg.target_modules)
        # peft swaps adapter layers into `backbone` in place, so the reward wrapper trains them as is.
        peft_model = get_peft_model(
            backbone,
            LoraConfig(
                r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
            ),
        )
    model.to(cfg.device).train()
    backbone_params = [p for p in backbone.parameters() if p.requires_grad]
    head_params = list(model.heads.parameters())
    params = backbone_params + head_params
    optimizer = torch.optim.AdamW(
        [{"params": backbone_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}]
    )
    schedule = _schedule(data, cfg)
    losses: list[float] = []
    with tqdm(schedule, desc="fine-tuning", unit="step", disable=not progress) as bar:
        for rated, pairs in bar:
            encoded, labels, pair_objective = data.select(rated, pairs)
            inputs = torch_inputs(
                model, encoded, builder.pad_id, builder.policy.padding_side, model.input_names()
            )
            rewards = model(*inputs)[0]
            loss = _loss(rewards, labels.to(cfg.device), pair_objective.to(cfg.device), cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    if peft_model is not None:
        backbone = peft_model.merge_and_unload()
    total_params = sum(p.numel() for p in [*backbone.parameters(), *model.heads.parameters()])

    out_dir = Path(out_dir)
    backbone_out, heads_out = out_dir / BACKBONE_DIR, out_dir / HEADS_FILE
    backbone_out.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(backbone_out)  # transformers 5 always writes safetensors
    builder.tokenizer.save_pretrained(backbone_out)
    save_heads(model.heads, heads_out)
    metrics = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": len(losses),
        "epochs": sum(len(r) + 2 * len(p) for r, p in schedule) / len(data.encoded),
        "seconds": time.perf_counter() - t0,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": total_params,
        "lora": cfg.lora,
        "ratings": data.n_rated,
        "pairs": data.n_pairs,
        "max_length": builder.policy.max_length,
    }
    return backbone_out, heads_out, metrics
