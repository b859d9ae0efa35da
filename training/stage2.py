"""Stage 2: the verbosity debiasing transform, then the gating network trained with Bradley–Terry on pairs.

Debiasing (ArmoRM): for every objective k, `r'_k = r_k - lambda_k * r_verbosity`, with the smallest
|lambda_k| that brings the Spearman correlation of r'_k with verbosity below a threshold on a reference set.
Each debiased objective is then scaled to unit standard deviation on the same set, so the gating mixes
objectives on one scale. Both steps are one K×K matrix `T` (the graph computes `rewards @ T`).

Gating: `score = sum_k gate_k(prompt) * (r @ T)_k`; the backbone and regression layer stay frozen, so the
margin of a pair is `gate(prompt) . ((r_chosen - r_rejected) @ T)` and training needs only cached rewards and
prompt embeddings. Ties are dropped (or down-weighted); early stopping on held-out pairs keeps the best state.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import spearmanr

from polyreward.models.torch.heads import GatingConfig, GatingNetwork

log = logging.getLogger("polyreward.stage2")


class Stage2Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threshold: float = Field(
        0.03, gt=0, lt=1, description="max |Spearman| of a debiased objective with verbosity"
    )
    hidden_dim: int = Field(256, ge=1)
    n_hidden: int = Field(2, ge=0)
    temperature: float = Field(10.0, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(512, ge=1)
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(15, ge=1, description="epochs without validation improvement before stopping")
    validation: float = Field(
        0.15, gt=0, lt=1, description="fraction of training pairs held out for stopping"
    )
    tie_weight: float = Field(0.0, ge=0, le=1, description="weight of tied pairs (0 drops them)")
    seed: int = 0


def debias_transform(rewards: np.ndarray, verbosity: int | None, threshold: float) -> tuple[np.ndarray, dict]:
    """K×K transform: subtract lambda_k × verbosity from each objective, then scale each to unit std."""
    k = rewards.shape[1]
    t = np.eye(k)
    lambdas = {}
    if verbosity is not None:
        v = rewards[:, verbosity]
        for j in range(k):
            if j != verbosity:
                lam = _debias_lambda(rewards[:, j], v, threshold)
                t[verbosity, j] = -lam
                lambdas[j] = lam
    std = (rewards @ t).std(0)
    t = t / np.where(std > 1e-12, std, 1.0)
    return t, lambdas


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho, 0 where it is undefined (a constant input)."""
    rho = spearmanr(a, b).statistic
    return 0.0 if np.isnan(rho) else float(rho)


def _debias_lambda(r: np.ndarray, v: np.ndarray, threshold: float) -> float:
    """Smallest |lambda| with |spearman(r - lambda v, v)| < threshold (bisection; the correlation falls with lambda)."""
    rho0 = spearman(r, v)
    if abs(rho0) < threshold:
        return 0.0
    sign = np.sign(rho0)
    target = sign * threshold * 0.5  # aim inside the band so the result is robustly below the threshold
    step = abs(np.cov(r, v)[0, 1] / max(v.var(), 1e-12)) or 1.0
    lo, hi = 0.0, step
    while sign * spearman(r - sign * hi * v, v) > abs(target) and hi < 1e6 * step:
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        if sign * spearman(r - sign * mid * v, v) > abs(target):
            lo = mid
        else:
            hi = mid
    return float(sign * hi)


@dataclass
class PairTensors:
    """Pairs as stage 2 needs them: reward differences after the transform, and the prompt's embedding."""

    delta: np.ndarray  # [P, K] (r_chosen - r_rejected) @ T
    gating_emb: np.ndarray  # [P, D]
    weight: np.ndarray  # [P] 1, or tie_weight for ties


def train_gating(
    train: PairTensors, val: PairTensors, hidden: int, cfg: Stage2Config, *, progress: bool = True
) -> tuple[GatingNetwork, dict]:
    """Bradley–Terry on `gate(prompt) . delta`; returns the state with the best validation loss."""
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    k = train.delta.shape[1]
    net = GatingNetwork(
        hidden, k, GatingConfig(temperature=cfg.temperature, hidden_dim=cfg.hidden_dim, n_hidden=cfg.n_hidden)
    )
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    x, d, w = as_t(train.gating_emb), as_t(train.delta), as_t(train.weight)
    vx, vd, vw = as_t(val.gating_emb), as_t(val.delta), as_t(val.weight)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            margin = (net(vx) * vd).sum(-1)
            loss = (torch.nn.functional.softplus(-margin) * vw).sum() / vw.sum()
            strict = vw >= 1
            return float(loss), float((margin[strict] > 0).float().mean())

    best = (evaluate()[0], copy.deepcopy(net.state_dict()), 0)
    history = []
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.max_epochs), desc="gating", unit="epoch", disable=not progress)
    for epoch in bar:
        net.train()
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            margin = (net(x[idx]) * d[idx]).sum(-1)
            loss = (torch.nn.functional.softplus(-margin) * w[idx]).sum() / w[idx].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        val_loss, val_acc = evaluate()
        history.append({"epoch": epoch + 1, "val_loss": val_loss, "val_accuracy": val_acc})
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
        if val_loss < best[0] - 1e-5:
            best = (val_loss, copy.deepcopy(net.state_dict()), epoch + 1)
        elif epoch + 1 - best[2] >= cfg.patience:
            break
    bar.close()
    net.load_state_dict(best[1])
    net.eval()
    val_loss, val_acc = evaluate()
    log.info(
        "gating: best epoch %d of %d, validation loss %.4f, accuracy %.3f",
        best[2],
        len(history),
        val_loss,
        val_acc,
    )
    return net, {"best_epoch": best[2], "epochs": len(history), "val_loss": val_loss, "val_accuracy": val_acc}
