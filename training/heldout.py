"""Held-out pair accuracy of trained gatings against the baselines, on cached embeddings (stage 2 and mixtures)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from polyreward.training.stage1 import fit_bradley_terry

if TYPE_CHECKING:
    from polyreward.training.pipeline import Run


def held_out(run: Run, stage1, t: np.ndarray, gatings: Mapping[str, torch.nn.Module]) -> dict:
    """Accuracy on the held-out pairs, overall, per dataset and its worst dataset: each of `gatings` (a module
    from the gating embedding to the weights of the debiased objectives; a mixture's is Σ_m π_m G_m) against
    (a) the uniform average of the objectives and (b) a linear probe on the embeddings."""
    test = [p for p in run.examples.pairs if p.split == "test" and not p.tie]
    if not test:
        return {}
    train = [p for p in run.examples.pairs if p.split == "train" and not p.tie]
    xc, xr, pval = run._pair_arrays(train, run.cfg.stage2.validation, "stage2")
    probe = fit_bradley_terry(xc, xr, pval, rank=1)
    tc, g = run.embed([p.items[0] for p in test])
    tr, _ = run.embed([p.items[1] for p in test])
    delta = (run._rewards(stage1, tc) - run._rewards(stage1, tr)) @ t
    margins = {}
    with torch.no_grad():
        for name, net in gatings.items():
            gates = effective_gating(net, torch.tensor(g, dtype=torch.float32)).double().numpy()
            margins[name] = (gates * delta).sum(-1)
    margins |= {"uniform_average": delta.mean(-1), "linear_probe": (tc - tr) @ probe.weight}
    datasets = sorted({p.dataset for p in test})
    out: dict = {}
    for name, m in margins.items():
        correct = m > 0
        per = {d: float(correct[[p.dataset == d for p in test]].mean()) for d in datasets}
        out[name] = {"accuracy": float(correct.mean()), "worst_dataset": min(per.values()), "datasets": per}
    out["n"] = len(test)
    return out


def effective_gating(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The weights the served score puts on the debiased objectives: a gating network's output, or a mixture's
    Σ_m π_m G_m."""
    out = net(x)
    if isinstance(out, tuple):
        probs, gating = out
        return (probs[:, :, None] * gating).sum(1)
    return out
