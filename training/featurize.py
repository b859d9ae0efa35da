"""Run the backbone once over every input and return pooled (reward, gating) embeddings.

Inputs go through the same `InputBuilder` and length-sorted batching as scoring, so the heads are fitted on
exactly the embeddings the exported graph computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from models.batching import plan_batches
from models.inputs import InputBuilder, Item
from models.torch_model import RewardModel, embed_torch


def featurize(
    model: RewardModel,
    builder: InputBuilder,
    items: Sequence[Item],
    *,
    token_budget: int = 16384,
    max_items: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(reward embeddings [N, D], gating embeddings [N, D]) in input order."""
    encoded = builder.encode(items)
    dim = model.backbone.config.hidden_size
    reward = np.zeros((len(encoded), dim), np.float32)
    gating = np.zeros((len(encoded), dim), np.float32)
    with tqdm(total=len(encoded), unit="item", desc="featurizing", disable=not progress) as bar:
        for batch in plan_batches([e.tokens for e in encoded], token_budget, max_items):
            r, g = embed_torch(
                model,
                [encoded[i] for i in batch],
                pad_id=builder.pad_id,
                padding_side=builder.policy.padding_side,
            )
            reward[batch], gating[batch] = r, g
            bar.update(len(batch))
    return reward, gating
