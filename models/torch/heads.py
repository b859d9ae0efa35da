"""Torch reward heads: regression layer, gating network, K×K transform, and fixed-weights mode.

Layout and semantics follow ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1):

    rewards = regression(reward_emb)                        [N, K]
    gating  = softmax(MLP(gating_emb) / T) * logit_scale    [N, K]   (moe)   or   fixed weights (fixed)
    score   = sum(gating * (rewards @ transform), -1)       [N]

Mixture heads (`kind: mixture`) carry M groups, each a weighting of the debiased objectives, and a router
π(prompt) over them (README, "Pluralistic and routed models"):

    group_gating = G [N, M, K]: fixed per group (softmax(θ_m) * s_m), or a gating network per group
    group_probs  = π = softmax(router(gating_emb) / T_router)            [N, M]
    group_scores = Σ_k G_mk (r @ T)_k                                   [N, M]
    gating       = Σ_m π_m G_m,   so   score = Σ_m π_m group_scores_m   (the router's mixture)

Heads fitted in closed form (stage 1) also carry each objective's posterior uncertainty, a fourth output:

    uncertainty = sqrt(scale * z' A^-1 z),  z = reward_emb - mean_k                         [N, K]

the posterior standard deviation of the reward, with A the ridge (or Laplace) posterior precision, stored
low-rank: A^-1 = (I - B'B) / alpha, where the rows of B are the top eigenvectors of the data covariance scaled
by sqrt(s / (s + alpha)); scale is the label noise variance (ridge) or 1 (Bradley–Terry).

With `normalize`, both embeddings are L2-normalized first (as sentence-transformers does for its models):
the raw mean-pooled norm shrinks for degenerate text, which would otherwise pull it towards the data mean.

Heads are stored as safetensors with their configuration as JSON in the file's metadata, so a heads file is
self-describing and loading it never unpickles anything.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.objectives import Objective, check_objectives

HEADS_METADATA_KEY = "polyreward.heads"
OUTPUTS = ["rewards", "gating", "score"]
GROUP_OUTPUTS = ["group_probs", "group_scores", "group_gating"]


class HeadsError(PolyrewardError, ValueError):
    """A heads file that is not ours, or whose tensors do not match its config."""


class GatingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(10.0, gt=0)
    hidden_dim: int = Field(1024, ge=1)
    n_hidden: int = Field(3, ge=0)


class MixtureConfig(BaseModel):
    """M groups and the router between them (`kind: mixture`)."""

    model_config = ConfigDict(extra="forbid")
    groups: list[str] = Field(min_length=1, description="group names, in output order")
    router: GatingConfig = Field(
        default_factory=lambda: GatingConfig(temperature=1.0, hidden_dim=256, n_hidden=1)
    )
    routing: Literal["latent", "category"] = Field(
        "latent", description="latent: groups found without labels; category: one group per task category"
    )
    components: Literal["fixed", "gated"] = Field(
        "fixed", description="a group's weighting: fixed, or a gating network of its own (per category)"
    )
    component_gating: GatingConfig | None = None


class HeadsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    objectives: list[Objective]
    hidden_size: int = Field(ge=1, description="backbone hidden size D the heads read")
    kind: Literal["moe", "fixed", "mixture"] = "moe"
    gating: GatingConfig | None = None
    mixture: MixtureConfig | None = None
    uncertainty_rank: int = Field(
        0, ge=0, description="rank of the stored posterior factors; 0 = no uncertainty output"
    )
    normalize: bool = Field(False, description="L2-normalize the embeddings before the heads")

    def model_post_init(self, _context) -> None:
        check_objectives(self.objectives)
        if self.kind == "moe" and self.gating is None:
            self.gating = GatingConfig()
        if (self.kind == "mixture") != (self.mixture is not None):
            raise ValueError("mixture: give it exactly when kind is 'mixture'")
        if self.mixture and self.mixture.components == "gated" and self.mixture.component_gating is None:
            self.mixture.component_gating = GatingConfig()


class GatingNetwork(nn.Module):
    """ArmoRM's gating MLP: `n_hidden` Linear+ReLU layers, a final Linear to K, temperature softmax, scale."""

    def __init__(self, in_features: int, out_features: int, cfg: GatingConfig):
        super().__init__()
        self.temperature = cfg.temperature
        self.logit_scale = nn.Parameter(torch.ones(1))
        dims = [in_features] + [cfg.hidden_dim] * cfg.n_hidden + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return torch.softmax(x / self.temperature, dim=-1) * self.logit_scale


class Mixture(nn.Module):
    """The router and the groups' weightings of a mixture head: (π [N, M], G [N, M, K]) from the gating
    embedding."""

    def __init__(self, in_features: int, k: int, cfg: MixtureConfig):
        super().__init__()
        self.cfg = cfg
        m = len(cfg.groups)
        self.router = GatingNetwork(in_features, m, cfg.router)
        self.router.logit_scale.requires_grad_(False)  # probabilities: the scale stays 1
        if cfg.components == "fixed":
            self.group_logits = nn.Parameter(torch.zeros(m, k))
            self.group_scale = nn.Parameter(torch.ones(m))
            self.components = None
        else:
            gating = cfg.component_gating or GatingConfig()
            self.components = nn.ModuleList(GatingNetwork(in_features, k, gating) for _ in range(m))

    def group_gating(self, x: torch.Tensor) -> torch.Tensor:
        if self.components is not None:
            return torch.stack([c(x) for c in self.components], 1)
        fixed = torch.softmax(self.group_logits, -1) * self.group_scale[:, None]
        return torch.zeros_like(x[:, :1, None]) + fixed  # [N, M, K]; the batch axis stays dynamic in a trace

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(x), self.group_gating(x)


class RewardHeads(nn.Module):
    """Everything after pooling. Runs in float32 whatever the backbone's dtype."""

    def __init__(self, cfg: HeadsConfig):
        super().__init__()
        self.cfg = cfg
        k, d = len(cfg.objectives), cfg.hidden_size
        self.regression = nn.Linear(d, k)
        self.gating = GatingNetwork(d, k, cfg.gating) if cfg.kind == "moe" and cfg.gating else None
        self.mixture = Mixture(d, k, cfg.mixture) if cfg.mixture else None
        self.register_buffer("transform", torch.eye(k))
        self.register_buffer("fixed_weights", torch.full((k,), 1.0 / k))
        if cfg.uncertainty_rank:
            self.register_buffer("uncertainty_mean", torch.zeros(k, d))
            self.register_buffer("uncertainty_basis", torch.zeros(k, cfg.uncertainty_rank, d))
            self.register_buffer("uncertainty_inv_alpha", torch.ones(k))
            self.register_buffer("uncertainty_scale", torch.ones(k))

    @property
    def needs_gating_input(self) -> bool:
        return self.gating is not None or self.mixture is not None

    @property
    def output_names(self) -> list[str]:
        names = [*OUTPUTS, "uncertainty"] if self.cfg.uncertainty_rank else list(OUTPUTS)
        return [*names, *GROUP_OUTPUTS] if self.mixture is not None else names

    def uncertainty(self, reward_emb: torch.Tensor) -> torch.Tensor:
        """Posterior standard deviation of each objective's reward [N, K], from the (normalized) embedding."""
        z = reward_emb.float()[:, None, :] - self.uncertainty_mean  # [N, K, D]
        projected = torch.einsum("nkd,krd->nkr", z, self.uncertainty_basis)
        quad = ((z * z).sum(-1) - (projected * projected).sum(-1)) * self.uncertainty_inv_alpha
        return torch.sqrt(self.uncertainty_scale * quad.clamp(min=0))

    def forward(
        self, reward_emb: torch.Tensor, gating_emb: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        reward_emb = reward_emb.float()
        if self.cfg.normalize:
            reward_emb = nn.functional.normalize(reward_emb, dim=-1)
        rewards = self.regression(reward_emb)
        if self.needs_gating_input:
            assert gating_emb is not None, "moe and mixture heads need the gating embedding"
            gating_emb = gating_emb.float()
            if self.cfg.normalize:
                gating_emb = nn.functional.normalize(gating_emb, dim=-1)
        groups: tuple[torch.Tensor, ...] = ()
        debiased = rewards @ self.transform
        if self.mixture is not None:
            probs, group_gating = self.mixture(gating_emb)
            gating = (probs[:, :, None] * group_gating).sum(1)
            groups = (probs, (group_gating * debiased[:, None, :]).sum(-1), group_gating)
        elif self.gating is not None:
            gating = self.gating(gating_emb)
        else:
            gating = self.fixed_weights.expand_as(rewards)
        score = (gating * debiased).sum(-1)
        if self.cfg.uncertainty_rank:
            return rewards, gating, score, self.uncertainty(reward_emb), *groups
        return rewards, gating, score, *groups


def save_heads(heads: RewardHeads, path: str | Path) -> None:
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in heads.state_dict().items()}
    if heads.gating is None:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("gating.")}
    save_file(tensors, str(path), metadata={HEADS_METADATA_KEY: heads.cfg.model_dump_json()})


def read_heads_config(path: str | Path) -> HeadsConfig:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(HEADS_METADATA_KEY)
    if meta is None:
        raise HeadsError(f"{path}: not a polyreward heads file (no '{HEADS_METADATA_KEY}' metadata)")
    return HeadsConfig.model_validate(json.loads(meta))


def load_heads(path: str | Path) -> RewardHeads:
    """Load heads from safetensors; a missing, extra or mis-shaped tensor is an error naming it."""
    cfg = read_heads_config(path)
    heads = RewardHeads(cfg)
    state = load_file(str(path))
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HeadsError(
            f"{path}: heads tensors do not match the config: missing {missing}, unexpected {unexpected}"
        )
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise HeadsError(
                f"{path}: tensor {name} has shape {list(t.shape)}, expected {list(expected[name].shape)}"
            )
    heads.load_state_dict(state)
    return heads.eval()
