"""Reward recipes: from a model's outputs to the reward a training run optimises. Torch-free (numpy only).

The service (`/v1/score`, `/v1/compare`, `/get_reward`), `polyreward score` and `polyreward eval` apply
recipes here, and the Python client and the TRL adapter send them to the service; docs/rewards.md has the formulas with their reasons. For one
item with raw head outputs r [K], gating g [K], epistemic standard deviations σe [K], the manifest's transform
T, residual variances s² and calibration stats:

    space      raw: x = r                       debiased (default): x = r @ T
    normalize  x ← (x − mean) / std             (the space's own stats; std = 0 counts as 1)
               — in both cases x = r @ A − b for a fixed matrix A [K, K] and offset b [K]
    transform  u_k = log σ(x_k − ref_k)        ref: fixed values, the mean of the other items of the same
                                                prompt in the request ("group"), or of the request's
                                                reference responses for that prompt ("references")
    aggregate  gating: Σ g_k y_k   sum: Σ w_k y_k   and: Σ w_k u_k (needs the transform)
               min: min over w_k > 0 of w_k y_k          (y = u with a transform, else x)
               mixture models, with G [M, K] the groups' weightings and s_m = Σ_k G_mk y_k:
               groups: Σ_m π'_m s_m, π'_m ∝ π_m w_m (group_weights)   worst_group: min_m (s_m − μ_m) / σ_m (MaxMin)
               gating with gating_offset δ: Σ (g_k + δ_k) y_k (a user's offset, from /v1/adapt)
               (gating, groups and worst_group without a transform take the graph's own score and group
               scores, which are in the debiased space whatever `space` says)
    pessimism  score ← aggregate − κ σ(score)
    constraint score ← score − penalty Σ_k max(0, min_k − x_k);  slack_k = x_k − min_k

Uncertainty: raw variances are diagonal, Σ = diag(σ²) with σe² (epistemic) or σe² + s² (predictive); heads
are fitted independently, and their label-noise correlation is not modelled. Everything above is linear in r
except the transform and `min`, which are linearized at the item's value (the delta method: d/dz log σ(z) =
σ(−z); `min` takes the gradient of the objective that attains it). So with β = A (c ⊙ J), c the aggregate's
weights and J the transform's derivative (1 without one), or β = T g for the gated score itself: Var(x_j) = Σ_k A_kj² σ_k², Var(score) = Σ_k β_k² σ_k².
References and group means count as fixed. Intervals at level l: x_j ± z_l √(Σ_k A_kj² σ̃_k²), with
σ̃_k = σp_k q_k(l) / z_l where the head has conformal multipliers q_k, else σp_k (Gaussian); in the raw space
this is exactly the split-conformal interval r_k ± q_k(l) σp_k. Raw values always come back beside.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from polyreward.models.runtime.items import Item
from polyreward.models.runtime.manifest import Manifest
from polyreward.models.runtime.scorer import ScoreResult
from polyreward.models.runtime.uncertainty import normal_quantile, stored_level
from polyreward.service.mixture import check_groups, group_aggregate, group_stats
from polyreward.service.recipe import Aggregate, RecipeError, RecipeSpec, Space


def prompt_key(item: Item) -> str | None:
    """Items with the same prompt (every message before the reply) form a group; text items have none."""
    messages = item.as_messages()
    return None if messages is None else json.dumps([m.model_dump() for m in messages[:-1]])


def log_sigmoid(z: np.ndarray) -> np.ndarray:
    """log σ(z) without overflow."""
    return -np.logaddexp(0.0, -z)


def sigmoid(x):
    """1 / (1 + e^-x) without overflow, for a float (→ float) or an array."""
    out = np.exp(-np.logaddexp(0.0, -np.asarray(x, np.float64)))
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class Recipe:
    """A `RecipeSpec` checked against one model and compiled to arrays (see the module docstring)."""

    spec: RecipeSpec
    names: tuple[str, ...]
    space: Space
    aggregate: Aggregate
    a: np.ndarray  # [K, K]: x = r @ a − b
    b: np.ndarray  # [K]
    transform: np.ndarray | None  # [K, K] T, for the gated score's gradient
    weights: np.ndarray | None  # [K]
    groups: tuple[str, ...]  # mixture models' groups (none otherwise)
    group_weights: np.ndarray | None  # [M]
    group_stats: np.ndarray  # [M, 2]: each group score's mean and std (the units worst_group compares)
    offset: np.ndarray | None  # [K] gating_offset
    residual: np.ndarray  # [K] s²
    conformal: tuple[tuple[float, ...] | None, ...]  # per objective, multipliers per stored level
    has_uncertainty: bool

    @classmethod
    def build(
        cls, manifest: Manifest, spec: RecipeSpec | None = None, rules: Sequence[str] = (), **fields
    ) -> Recipe:
        """Check `spec` (or the fields given) against the model and the names of the rule objectives that
        follow its learned ones: unknown objectives, a transform it lacks, stats it has no record of,
        uncertainty its heads do not carry → `RecipeError` naming the field."""
        spec = RecipeSpec(**fields) if spec is None else spec
        learned = tuple(manifest.objective_names)
        names, k = (*learned, *rules), len(learned)
        for field, given in [
            ("weights", spec.weights),
            ("gating_offset", spec.gating_offset),
            ("transform.reference", spec.transform and not isinstance(spec.transform.reference, str)
             and spec.transform.reference),
            ("constraints.min", spec.constraints and spec.constraints.min),
        ]:  # fmt: skip
            unknown = sorted(set(given or ()) - set(names))
            if unknown:
                raise RecipeError(
                    f"{field}: unknown objectives {unknown}; known: {list(names)}", "unknown_objective"
                )
        space = spec.space or ("debiased" if manifest.transform is not None else "raw")
        if space == "debiased" and manifest.transform is None:
            raise RecipeError(
                f"space: model {manifest.name!r} records no transform (exported before manifest schema 3); "
                "re-export it, or ask for space 'raw'", "no_transform",
            )  # fmt: skip
        transform = None if manifest.transform is None else np.array(manifest.transform, np.float64)
        a = transform if space == "debiased" else np.eye(k)
        b = np.zeros(k)
        if spec.normalize:
            field = "calibration" if space == "raw" else "debiased_calibration"
            stats = getattr(manifest, field) or {}
            missing = [n for n in learned if n not in stats]
            if missing:
                raise RecipeError(
                    f"normalize: model {manifest.name!r} has no {space} calibration stats for {missing}",
                    "no_calibration",
                )
            mean = np.array([stats[n].mean for n in learned])
            std = np.array([stats[n].std or 1.0 for n in learned])
            a, b = a / std, mean / std
        # rule objectives: the same value in every space, never normalized, no uncertainty
        a, b = _with_identity(a, len(rules)), np.concatenate([b, np.zeros(len(rules))])
        if transform is not None:
            transform = _with_identity(transform, len(rules))
        groups = tuple(manifest.head.groups or ())
        default = (
            "sum" if spec.weights is not None else "groups" if spec.group_weights is not None else "gating"
        )
        aggregate = spec.aggregate or default
        check_groups(spec, aggregate, groups, manifest.name)
        if aggregate == "gating" and spec.weights is not None:
            raise RecipeError(
                "weights: aggregate 'gating' mixes by the model's own gating; leave weights out or set "
                "aggregate to sum, and or min", "conflicting_options",
            )  # fmt: skip
        if aggregate in ("sum", "and", "min") and spec.weights is None:
            raise RecipeError(
                f"weights: aggregate {aggregate!r} needs weights naming the objectives", "needs_weights"
            )
        if aggregate == "min" and not any((spec.weights or {}).values()):
            raise RecipeError("weights: aggregate 'min' needs at least one non-zero weight", "needs_weights")
        if aggregate == "and" and spec.transform is None:
            raise RecipeError(
                "transform: aggregate 'and' is the sum of log-sigmoids and needs transform.reference",
                "needs_transform",
            )
        if isinstance(ref := spec.transform and spec.transform.reference, dict):
            used = [n for n, w in zip(names, _vector(names, spec.weights, 1.0), strict=True) if w]
            missing = [n for n in used if n not in ref]
            if missing:
                raise RecipeError(f"transform.reference: no value for {missing}", "missing_reference")
        has_uncertainty = any("uncertainty" in g.outputs for g in manifest.graphs.values())
        if spec.pessimism is not None and not has_uncertainty:
            raise RecipeError(
                f"pessimism: model {manifest.name!r} has no uncertainty output", "no_uncertainty"
            )
        if spec.pessimism is not None and transform is None and aggregate == "gating" and not spec.transform:
            raise RecipeError(
                f"pessimism: model {manifest.name!r} records no transform, so its gated score's σ is unknown; "
                "give weights", "no_transform",
            )  # fmt: skip
        info = manifest.uncertainty or {}
        return cls(
            spec=spec, names=names, space=space, aggregate=aggregate, a=a, b=b, transform=transform,
            weights=None if spec.weights is None else _vector(names, spec.weights, 0.0),
            groups=groups, group_weights=None if spec.group_weights is None else _vector(groups, spec.group_weights, 0.0),
            group_stats=group_stats(manifest.head.group_calibration, groups),
            offset=None if spec.gating_offset is None else _vector(names, spec.gating_offset, 0.0),
            residual=np.array([info[n].residual_variance if n in info else 0.0 for n in names]),
            conformal=tuple(tuple(info[n].conformal) if n in info and info[n].conformal else None for n in names),
            has_uncertainty=has_uncertainty,
        )  # fmt: skip

    @property
    def needs_groups(self) -> bool:
        return self.spec.transform is not None and self.spec.transform.reference == "group"

    @property
    def needs_references(self) -> bool:
        return self.spec.transform is not None and self.spec.transform.reference == "references"

    def check(
        self,
        groups: Sequence[str | None] | None = None,
        references: Collection[str] | None = None,
        extras: Sequence[str] = (),
        level: float = 0.9,
    ) -> list[list[int]] | None:
        """Every check that needs no scores (the service runs it before scoring): the extras the model can
        give, the level, groups and references where the recipe reads them. Returns each item's group
        (the indices of the items of its prompt) where the recipe or the extras need groups."""
        if {"uncertainty", "intervals"} & set(extras) and not self.has_uncertainty:
            raise RecipeError("return: this model's heads carry no uncertainty output", "no_uncertainty")
        if not 0.01 <= level <= 0.99:
            raise RecipeError(f"level: {level} is outside [0.01, 0.99]", "invalid_level")
        members = None
        if self.needs_groups or {"group_ranks", "group_z"} & set(extras):
            members = _groups(groups)
        if self.needs_groups:
            alone = next((i for i, peers in enumerate(members) if len(peers) < 2), None)  # type: ignore[arg-type]
            if alone is not None:
                raise RecipeError(
                    f"transform.reference: items[{alone}] is the only item of its prompt in the request; "
                    "'group' needs at least two responses per prompt", "group_too_small",
                )  # fmt: skip
        if self.needs_references:
            missing = next(
                (i for i, g in enumerate(groups or ()) if g is None or g not in (references or ())), None
            )
            if missing is not None or not groups:
                raise RecipeError(
                    f"references: no reference response for the prompt of items[{missing or 0}]",
                    "missing_reference",
                )
        return members

    def values(self, results: Sequence[ScoreResult]) -> np.ndarray:
        """x [N, K]: every item's objectives in the recipe's space."""
        return np.array([r.rewards for r in results], np.float64) @ self.a - self.b

    def apply(
        self,
        results: Sequence[ScoreResult],
        groups: Sequence[str | None] | None = None,
        references: Mapping[str, Sequence[ScoreResult]] | None = None,
        extras: Sequence[str] = (),
        level: float = 0.9,
    ) -> list[dict]:
        """Per item a dict of the response fields: score, rewards (x), raw, and what the recipe and `extras`
        add (gating, transformed, slack, uncertainty, intervals, group_ranks, group_z)."""
        members = self.check(groups, references, extras, level)
        spec = self.spec
        x = self.values(results)
        gating = np.array([r.gating for r in results], np.float64)
        # y: what the aggregate combines, jac: dy/dx
        y, jac, transformed = x, np.ones_like(x), None
        if spec.transform is not None:
            ref = self._reference(x, members, groups, references or {})
            transformed = log_sigmoid(x - ref)
            y, jac = transformed, sigmoid(-(x - ref))
        aggregate, beta = self._aggregate(
            y, jac, gating, np.array([r.score for r in results], np.float64), results
        )
        score = aggregate
        sig_e = sig_p = None
        if self.has_uncertainty and results[0].uncertainty is not None:
            sig_e = np.array([r.uncertainty for r in results], np.float64)
            sig_p = np.sqrt(sig_e**2 + self.residual)
        if spec.pessimism is not None and spec.pessimism.kappa:
            sig = sig_e if spec.pessimism.uncertainty == "epistemic" else sig_p
            score = score - spec.pessimism.kappa * np.sqrt(((beta * sig) ** 2).sum(-1))
        slack = None
        if spec.constraints is not None:
            index = [self.names.index(o) for o in spec.constraints.min]
            slack = x[:, index] - np.array(list(spec.constraints.min.values()))
            score = score - spec.constraints.penalty * np.maximum(0.0, -slack).sum(-1)
        if not np.isfinite(score).all():  # bounded inputs keep this from happening; never answer a non-number
            raise RecipeError("the recipe's score is not a finite number for these items", "non_finite")
        out = []
        for i, r in enumerate(results):
            row: dict = {"score": float(score[i]), "rewards": x[i].tolist(),
                         "raw": {"score": r.score, "rewards": list(r.rewards)}}  # fmt: skip
            if self.aggregate == "gating":
                row["gating"] = list(r.gating)
            if r.group_probs is not None:
                row["group_probs"], row["group_scores"] = r.group_probs, r.group_scores
            if transformed is not None:
                row["transformed"] = transformed[i].tolist()
            if slack is not None:
                row["slack"] = dict(zip(spec.constraints.min, slack[i].tolist(), strict=True))  # type: ignore[union-attr]
            if sig_e is not None and "uncertainty" in extras:
                row["uncertainty"] = {
                    "epistemic": self._std(sig_e[i]).tolist(),
                    "predictive": self._std(sig_p[i]).tolist(),  # type: ignore[index]
                    "score": {
                        "epistemic": _norm(beta[i] * sig_e[i]),
                        "predictive": _norm(beta[i] * sig_p[i]),
                    },  # type: ignore[index]
                }
            if sig_p is not None and "intervals" in extras:
                row["intervals"] = self._intervals(x[i], aggregate[i], beta[i], sig_p[i], level)
            if members is not None and {"group_ranks", "group_z"} & set(extras):
                peers = x[members[i]]
                if "group_ranks" in extras:
                    below, tied = (peers < x[i]).sum(0), (peers == x[i]).sum(0)
                    row["group_ranks"] = ((below + tied / 2) / len(peers)).tolist()
                if "group_z" in extras:
                    std = peers.std(0)
                    row["group_z"] = np.where(
                        std > 0, (x[i] - peers.mean(0)) / np.where(std > 0, std, 1), 0.0
                    ).tolist()
            out.append(row)
        return out

    def _std(self, sigma: np.ndarray) -> np.ndarray:
        """σ of each x_j from the raw σ: √(Σ_k A_kj² σ_k²)."""
        return np.sqrt((self.a**2 * (sigma**2)[:, None]).sum(0))

    def _intervals(self, x, score, beta, sig_p, level) -> dict:
        z = normal_quantile(level)
        j = stored_level(level)
        scaled = np.array([q[j] / z if q else 1.0 for q in self.conformal]) * sig_p
        half = z * self._std(scaled)
        sigma = _norm(beta * scaled)
        return {
            "level": level,
            "rewards": np.stack([x - half, x + half], -1).tolist(),
            "score": None if sigma is None else [float(score - z * sigma), float(score + z * sigma)],
        }

    def _aggregate(self, y, jac, gating, model_score, results) -> tuple[np.ndarray, np.ndarray]:
        """(aggregate [N], its gradient with respect to the raw rewards, β [N, K]).

        `gating` without a transform is the model's own score (the graph's value), Σ_j g_j (r @ T)_j, so
        β = T g (and the same for a group's score with its weighting for g); otherwise the aggregate's
        weights c on y give β = A (c ⊙ dy/dx)."""
        if self.aggregate in ("groups", "worst_group"):
            score, coef = group_aggregate(self, y, results)
        elif self.aggregate == "gating":
            score, coef = model_score, gating
        offset = np.zeros(y.shape[1]) if self.offset is None else self.offset
        if self.aggregate in ("gating", "groups", "worst_group") and self.spec.transform is None:
            t = self.transform if self.transform is not None else np.full((len(self.names),) * 2, np.nan)
            return score + y @ offset, coef @ t.T + offset @ self.a.T
        if self.aggregate == "gating":
            coef = coef + offset
            score = (coef * y).sum(-1)
        elif self.aggregate == "min":
            w = self.weights
            active = np.flatnonzero(w)
            weighted = y[:, active] * w[active]
            worst = active[weighted.argmin(-1)]
            coef = np.zeros_like(y)
            coef[np.arange(len(y)), worst] = w[worst]
            score = weighted.min(-1)
        elif self.aggregate in ("sum", "and"):  # (the group aggregates' are group_aggregate's, on this y)
            score, coef = y @ self.weights, np.broadcast_to(self.weights, y.shape)
        return score, (coef * jac) @ self.a.T

    def _reference(self, x, members, groups, references) -> np.ndarray:
        """ref [N, K] for the transform (`check` has made sure groups and references exist)."""
        ref = self.spec.transform.reference  # type: ignore[union-attr]
        if isinstance(ref, dict):
            return np.array([ref.get(n, 0.0) for n in self.names])
        if ref == "group":
            return np.array([x[[j for j in peers if j != i]].mean(0) for i, peers in enumerate(members)])
        return np.array([self.values(references[g]).mean(0) for g in groups])


def _with_identity(a: np.ndarray, r: int) -> np.ndarray:
    """[[a, 0], [0, I_r]]: the matrix that leaves r appended rule columns as they are."""
    k = len(a)
    out = np.eye(k + r)
    out[:k, :k] = a
    return out


def _vector(names: Sequence[str], given: Mapping[str, float] | None, fill: float) -> np.ndarray:
    return np.array([given.get(n, 0.0) for n in names] if given is not None else [fill] * len(names))


def _norm(v: np.ndarray) -> float | None:
    """√(Σ v²); None where it is unknown (a gated score without the model's transform)."""
    out = float(np.sqrt((v**2).sum()))
    return out if math.isfinite(out) else None


def _groups(groups: Sequence[str | None] | None) -> list[list[int]]:
    """For each item, the indices of the items of its prompt (itself included)."""
    for i, g in enumerate(groups or [None]):
        if g is None:
            raise RecipeError(
                f"items[{i}]: a text item has no prompt to group by; send messages or prompt+response",
                "no_group",
            )
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):  # type: ignore[arg-type]
        index.setdefault(g, []).append(i)  # type: ignore[arg-type]
    return [index[g] for g in groups]  # type: ignore[index,union-attr]


def margin_probability(margin: float, variance: float = 0.0) -> float:
    """P(chosen ≻ rejected) = E[σ(m)] for m ~ N(margin, variance), by the probit approximation
    σ(margin / √(1 + π·variance / 8)); variance 0 gives σ(margin)."""
    return sigmoid(margin / math.sqrt(1.0 + math.pi * variance / 8.0))


def named(names: Sequence[str], values: Sequence[float] | None) -> dict[str, float] | None:
    """Values keyed by objective name (None stays None)."""
    return None if values is None else dict(zip(names, values, strict=True))
