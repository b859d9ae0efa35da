"""Stage 1: per-objective linear reward heads fitted by ridge regression on backbone embeddings."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from models.export import input_policy
from models.heads import HeadsConfig, RewardHeads
from models.inputs import InputBuilder, Item
from models.objectives import Objective
from models.torch_model import build_reward_model, detect_kind, load_backbone
from training.featurize import featurize
from training.ridge import fit_ridge


def fit_objectives(
    backbone_dir: str | os.PathLike,
    items: Sequence[Item],
    labels: np.ndarray,
    objectives: Sequence[Objective],
    *,
    alpha: float = 1.0,
    progress: bool = True,
) -> tuple[RewardHeads, np.ndarray]:
    """Featurize `items`, fit one ridge head per objective (NaN labels skipped).

    Returns fixed-weights heads (equal weights) and the in-sample predictions [N, K].
    """
    config, backbone, tokenizer = load_backbone(backbone_dir)
    kind = detect_kind(config)
    heads = RewardHeads(
        HeadsConfig(objectives=list(objectives), hidden_size=config.hidden_size, kind="fixed")
    )
    model = build_reward_model(backbone, heads, kind)
    policy = input_policy(config, tokenizer, kind)
    reward_emb, _ = featurize(model, InputBuilder(tokenizer, kind, policy), items, progress=progress)
    weights, bias = fit_ridge(reward_emb, labels, alpha)
    with torch.no_grad():
        heads.regression.weight.copy_(torch.from_numpy(weights))
        heads.regression.bias.copy_(torch.from_numpy(bias))
    return heads.eval(), reward_emb @ weights.T + bias
