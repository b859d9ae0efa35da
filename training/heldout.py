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
    """Accuracy on the held-out pairs, overall, per dataset and per hidden label (the objective a pair was
    labelled for: RMB's goal, HH's harmlessness), with the worst of each: each of `gatings` (a module from the
    gating embedding to the weights of the debiased objectives; a mixture's is Σ_m π_m G_m) against (a) the
    uniform average of the objectives and (b) a linear probe on the embeddings. `ari` compares the hidden
    labels with each gating's partition of the prompts: a mixture's most probable group, a single gating's
    heaviest objective."""
    from sklearn.metrics import adjusted_rand_score

    test = [p for p in run.examples.pairs if p.split == "test" and not p.tie]
    if not test:
        return {}
    train = [p for p in run.examples.pairs if p.split == "train" and not p.tie]
    xc, xr, pval = run._pair_arrays(train, run.cfg.stage2.validation, "stage2")
    probe = fit_bradley_terry(xc, xr, pval, rank=1)
    tc, g = run.embed([p.items[0] for p in test])
    tr, _ = run.embed([p.items[1] for p in test])
    delta = (run._rewards(stage1, tc) - run._rewards(stage1, tr)) @ t
    margins, partitions = {}, {}
    with torch.no_grad():
        for name, net in gatings.items():
            out = net(torch.tensor(g, dtype=torch.float32))
            partitions[name] = (out[0] if isinstance(out, tuple) else out).argmax(-1).numpy()
            margins[name] = (
                effective_gating(net, torch.tensor(g, dtype=torch.float32)).double().numpy() * delta
            ).sum(-1)
    margins |= {"uniform_average": delta.mean(-1), "linear_probe": (tc - tr) @ probe.weight}
    labelled = np.array([p.objective is not None for p in test])
    labels = [p.objective for p in test if p.objective is not None]
    out: dict = {}
    for name, m in margins.items():
        correct = m > 0
        by = {
            key: {v: float(correct[[getattr(p, key) == v for p in test]].mean()) for v in sorted(values)}
            for key, values in (("dataset", {p.dataset for p in test}), ("objective", set(labels)))
        }
        out[name] = {
            "accuracy": float(correct.mean()), "worst_dataset": min(by["dataset"].values()),
            "worst_label": min(by["objective"].values(), default=None), "datasets": by["dataset"],
            "labels": by["objective"],
        }  # fmt: skip
        if name in partitions and labels:
            out[name]["ari"] = float(adjusted_rand_score(labels, partitions[name][labelled]))
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
