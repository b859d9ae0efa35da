"""Pluralistic and routed heads: M groups, each a weighting of the debiased objectives, and a router π(prompt).

Both fit on the cached pair tensors stage 2 uses (`PairTensors`: Δ = (r_chosen − r_rejected) @ T and the
prompt's gating embedding), with the backbone and regression layer frozen:

* **latent groups** (MiCRo's mixture of Bradley–Terry models with context-aware routing), found without
  group labels by maximizing the marginal likelihood directly (Adam, not EM):

      P(chosen ≻ rejected | x) = Σ_m π_m(x) σ(G_m(x) · Δ)

  G_m is a fixed weighting (softmax(θ_m)·s_m) or a gating network of its own (`components: gated`; M = 1 is
  then exactly stage 2's single gating). M is chosen among `groups` by the validation pairs' likelihood, the
  best of `restarts` random starts for each M.
* **task categories** (DMoERM's outer router): π is a classifier trained with cross-entropy on the pairs'
  category labels (`category_of`), then frozen; each category's gating network is trained on the served
  score's margin, Σ_c π_c(x) G_c(x) · Δ, with Bradley–Terry.

The exported graph gives per item the router's probabilities and every group's score beside the objective
vector (`polyreward.models.torch.heads`); its own score is the router's mixture Σ_m π_m s_m.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from polyreward.models.torch.heads import GatingConfig, Mixture, MixtureConfig
from polyreward.training.stage2 import PairTensors

log = logging.getLogger("polyreward.mixture")


class MixtureTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    routing: Literal["latent", "category"] = "latent"
    components: Literal["fixed", "gated"] = Field(
        "fixed", description="a group's weighting: fixed, or a gating network of its own (category: always)"
    )
    groups: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4], min_length=1, description="latent: M to try"
    )
    restarts: int = Field(3, ge=1, description="latent: random starts per M (the best validation loss wins)")
    category_depth: int = Field(
        1, ge=0, le=3, description="category: the dataset's name plus this many leading parts of the subset"
    )
    min_category_pairs: int = Field(100, ge=1, description="category: smaller categories join 'other'")
    router_hidden_dim: int = Field(256, ge=1)
    router_n_hidden: int = Field(1, ge=0)
    router_temperature: float = Field(1.0, gt=0)
    component_hidden_dim: int = Field(256, ge=1)
    component_n_hidden: int = Field(2, ge=0)
    component_temperature: float = Field(10.0, gt=0)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(512, ge=1)
    max_epochs: int = Field(1000, ge=1)
    patience: int = Field(50, ge=1, description="epochs without validation improvement before stopping")
    seed: int = 0

    def mixture_config(self, groups: Sequence[str], components: str) -> MixtureConfig:
        return MixtureConfig(
            groups=list(groups), routing=self.routing, components=components,  # type: ignore[arg-type]
            router=GatingConfig(
                temperature=self.router_temperature, hidden_dim=self.router_hidden_dim, n_hidden=self.router_n_hidden
            ),
            component_gating=GatingConfig(
                temperature=self.component_temperature, hidden_dim=self.component_hidden_dim,
                n_hidden=self.component_n_hidden,
            ) if components == "gated" else None,
        )  # fmt: skip


def category_of(dataset: str, subset: str | None, depth: int) -> str:
    """A pair's task category: its dataset, plus the first `depth` parts of its subset ('rmb/Harmlessness')."""
    parts = (subset or "").split("/")[:depth]
    return "/".join([dataset, *filter(None, parts)])


def categories(labels: Sequence[str], min_pairs: int) -> list[str]:
    """The categories with at least `min_pairs` pairs (most common first); the rest are 'other'."""
    counts = Counter(labels)
    kept = [c for c, n in counts.most_common() if n >= min_pairs]
    return kept + (["other"] if len(kept) < len(counts) else [])


def _tensors(t: PairTensors) -> tuple[torch.Tensor, ...]:
    as_t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return as_t(t.gating_emb), as_t(t.delta), as_t(t.weight)


def pair_nll(net: Mixture, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """−log Σ_m π_m(x_i) σ(G_m(x_i) · Δ_i) for each pair [P]."""
    probs, gating = net(x)
    log_p = torch.nn.functional.logsigmoid((gating * delta[:, None, :]).sum(-1))  # [P, M]
    return -torch.logsumexp(log_p + torch.log(probs.clamp_min(1e-12)), -1)


def mixture_nll(net: Mixture, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """−(1/Σw) Σ_i w_i log Σ_m π_m(x_i) σ(G_m(x_i) · Δ_i): the latent mixture's loss (mean per pair)."""
    return (pair_nll(net, x, delta) * weight).sum() / weight.sum()


def one_standard_error(losses: dict[int, np.ndarray], weight: np.ndarray) -> int:
    """The smallest M whose mean validation loss is within one standard error of the best one's, the error
    taken over the per-pair differences from the best M (the pairs are shared, so they are paired)."""
    mean = lambda v: float((v * weight).sum() / weight.sum())  # noqa: E731
    best = min(losses, key=lambda m: mean(losses[m]))
    used = weight > 0
    for m in sorted(losses):
        diff = (losses[m] - losses[best])[used]
        if m == best or mean(losses[m]) - mean(losses[best]) <= diff.std(ddof=1) / np.sqrt(len(diff)):
            return m
    return best


def served_nll(net: Mixture, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry on the served score's margin, Σ_m π_m G_m · Δ (the routed model's loss)."""
    probs, gating = net(x)
    margin = ((probs[:, :, None] * gating).sum(1) * delta).sum(-1)
    return (torch.nn.functional.softplus(-margin) * weight).sum() / weight.sum()


def _fit(
    net: torch.nn.Module,
    loss_of: Callable[..., torch.Tensor],
    train: tuple[torch.Tensor, ...],
    val: tuple[torch.Tensor, ...],
    cfg: MixtureTrainConfig,
    seed: int,
    params=None,
) -> tuple[float, int]:
    """Adam with early stopping on the validation loss; `net` ends in its best state. Returns (loss, epoch)."""
    opt = torch.optim.AdamW(params or net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def val_loss() -> float:
        with torch.no_grad():
            return float(loss_of(net, *val))

    best = (val_loss(), copy.deepcopy(net.state_dict()), 0)
    for epoch in range(1, cfg.max_epochs + 1):
        net.train()
        for idx in torch.randperm(len(train[0]), generator=gen).split(cfg.batch_size):
            loss = loss_of(net, *(t[idx] for t in train))
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        if (current := val_loss()) < best[0] - 1e-5:
            best = (current, copy.deepcopy(net.state_dict()), epoch)
        elif epoch - best[2] >= cfg.patience:
            break
    net.load_state_dict(best[1])
    net.eval()
    return best[0], best[2]


def fit_latent(
    train: PairTensors, val: PairTensors, hidden: int, cfg: MixtureTrainConfig, *, progress: bool = True
) -> tuple[Mixture, dict]:
    """Latent groups: for each M in `cfg.groups` the best of `cfg.restarts` fits by validation likelihood, and
    of those the smallest M within one standard error of the best (`one_standard_error`); returns its heads
    and every candidate's validation loss."""
    from tqdm import tqdm

    k = train.delta.shape[1]
    tr, va = _tensors(train), _tensors(val)
    best: dict[int, tuple[float, Mixture, int]] = {}
    runs = [(m, r) for m in sorted(set(cfg.groups)) for r in range(cfg.restarts)]
    for m, restart in tqdm(runs, desc="mixture", unit="fit", disable=not progress):
        seed = cfg.seed + 1000 * m + restart
        torch.manual_seed(seed)
        net = Mixture(hidden, k, cfg.mixture_config([f"group-{i + 1}" for i in range(m)], cfg.components))
        if net.components is None:  # break the groups' symmetry: each starts from its own random weighting
            with torch.no_grad():
                net.group_logits.normal_(0.0, 1.0)
        loss, epoch = _fit(net, mixture_nll, tr, va, cfg, seed)
        log.info("mixture M=%d start %d: validation loss %.4f (epoch %d)", m, restart, loss, epoch)
        if m not in best or loss < best[m][0]:
            best[m] = (loss, net, epoch)
    with torch.no_grad():
        per_pair = {m: pair_nll(net, va[0], va[1]).double().numpy() for m, (_, net, _) in best.items()}
    m = one_standard_error(per_pair, va[2].double().numpy())
    loss, net, epoch = best[m]
    candidates = {n: v[0] for n, v in best.items()}
    return net, {
        "groups": m, "val_loss": loss, "best_epoch": epoch, "candidates": candidates,
        "selection": "the smallest M within one standard error of the best validation loss",
    }  # fmt: skip


def fit_routed(
    train: PairTensors,
    val: PairTensors,
    train_labels: np.ndarray,
    val_labels: np.ndarray,
    names: Sequence[str],
    hidden: int,
    cfg: MixtureTrainConfig,
) -> tuple[Mixture, dict]:
    """Task categories: the router as a classifier of the category labels (indices into `names`), then one
    gating network per category trained on the served margin with the router frozen."""
    torch.manual_seed(cfg.seed)
    net = Mixture(hidden, train.delta.shape[1], cfg.mixture_config(names, "gated"))
    tr, va = _tensors(train), _tensors(val)
    y, vy = torch.tensor(train_labels), torch.tensor(val_labels)

    def router_loss(net: Mixture, x, _delta, weight, labels) -> torch.Tensor:
        log_p = torch.log(net.router(x).clamp_min(1e-12))
        return (torch.nn.functional.nll_loss(log_p, labels, reduction="none") * weight).sum() / weight.sum()

    router_val, _ = _fit(net, router_loss, (*tr, y), (*va, vy), cfg, cfg.seed, net.router.parameters())
    with torch.no_grad():
        accuracy = float((net.router(va[0]).argmax(-1) == vy).float().mean())
    net.router.requires_grad_(False)
    loss, epoch = _fit(net, served_nll, tr, va, cfg, cfg.seed + 1, net.components.parameters())  # type: ignore[union-attr]
    return net, {
        "groups": len(names), "val_loss": loss, "best_epoch": epoch, "router_val_loss": router_val,
        "router_val_accuracy": accuracy,
    }  # fmt: skip
