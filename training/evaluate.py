"""Evaluate an exported artifact with its ONNX graph (not torch): the numbers users will get when serving it.

Pairwise accuracy overall, per dataset and per subset; per-objective Pearson / Spearman / MSE and 90 % interval
coverage on rated responses; best-of-N accuracy; calibration of P(chosen ≻ rejected) = sigmoid(score margin)
as ECE, and of its probit form with the margin's epistemic σ (README, "Uncertainty"); length
bias (Spearman of score with response length); mean gating weights per subset; mean uncertainty; and the
pluralistic report (`polyreward.training.evaluate_groups`: worst-group accuracy, a mixture's groups against the
hidden label, the few-shot curve). Writes `report.json` and PNG plots next to the artifact.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

from polyreward.models.runtime.rules import RuleSet
from polyreward.models.runtime.scorer import Scorer, ScoreResult
from polyreward.service.postprocess import Recipe
from polyreward.training.data.examples import Examples
from polyreward.training.evaluate_groups import groups_report, plot_groups

log = logging.getLogger("polyreward.eval")

ECE_BINS = 10
COVERAGE_LEVEL = 0.9


def _subset(dataset: str, subset: str | None) -> str:
    return f"{dataset}/{subset}" if subset else dataset


def _ece(margin: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error of P(chosen ≻ rejected) = sigmoid(margin), and the reliability table.

    Each pair is judged by its confidence max(p, 1 - p) in the predicted winner, against how often that
    prediction is right, in equal-width bins over [0.5, 1].
    """
    p = 1 / (1 + np.exp(-margin))
    confidence, correct = np.maximum(p, 1 - p), margin > 0
    edges = np.linspace(0.5, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            conf, acc = float(confidence[sel].mean()), float(correct[sel].mean())
            ece += sel.mean() * abs(conf - acc)
            table.append({"bin": b, "n": int(sel.sum()), "confidence": conf, "accuracy": acc})
    return float(ece), table


def _corr(f, a, b) -> float:
    return float(f(a, b).statistic) if len(a) > 2 and np.std(a) > 0 and np.std(b) > 0 else math.nan


def evaluate(
    artifact: str | Path,
    examples: Examples,
    *,
    precision: str = "fp32",
    scales: dict[tuple[str, str], tuple[float, float]] | None = None,
    baselines: dict | None = None,
    progress: bool = True,
    plots: bool = True,
    rules: RuleSet | None = None,
) -> dict:
    """Score every example's responses with the artifact and compute the report (also written to disk). With
    `rules`, the heads read the stripped replies and the report gains each rule objective's mean and how often
    it prefers the chosen side of a pair."""
    artifact = Path(artifact)
    scorer = Scorer(artifact, precision=precision, device="cpu")  # type: ignore[arg-type]
    names = scorer.objectives
    items = [e.item for e in examples.ratings]
    items += [it for p in examples.pairs for it in p.items]
    items += [it for b in examples.bon for it in b.items]
    if not items:
        raise ValueError("nothing to evaluate: no rated responses, pairs or best-of-N sets in the data")
    rules = rules or RuleSet()
    rules.check(names)
    rules.check_labels(items)
    stripped, _ = rules.strip(items)
    results = scorer.score(stripped, progress=progress)
    checks = rules.evaluate(items, stripped, scorer.builder.count_tokens)
    sigma = _score_sigma(scorer, results)
    n_r, n_p = len(examples.ratings), 2 * len(examples.pairs)
    rated, paired, bon = results[:n_r], results[n_r : n_r + n_p], results[n_r + n_p :]

    report: dict = {
        "artifact": str(artifact),
        "model": scorer.manifest.name,
        "precision": precision,
        "objectives": names,
    }
    report.update(_pairs_report(examples, paired, names, None if sigma is None else sigma[n_r : n_r + n_p]))
    report["groups"] = groups_report(
        examples, paired, scorer.manifest, report.get("subsets", {}), report.get("subset_sizes", {})
    )
    report["ratings"] = _ratings_report(examples, rated, names, scales or {}, scorer)
    report["bon"] = _bon_report(examples, bon)
    responses = [it.as_messages()[-1].content for it in items]  # type: ignore[index]
    lengths = np.array([len(r.split()) for r in responses])
    report["length_bias"] = {
        "spearman_score_vs_words": _corr(spearmanr, np.array([r.score for r in results]), lengths),
        "n": len(results),
    }
    if results[0].uncertainty is not None:
        unc = np.array([r.uncertainty for r in results])
        report["uncertainty_mean"] = dict(zip(names, unc.mean(0).tolist(), strict=True))
    if rules.names:
        report["rules"] = _rules_report(examples, checks.values, rules, n_r, n_p)
    if baselines:
        report["baselines_from_embeddings"] = baselines
    report = _json_safe(report)
    (artifact / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if plots:
        _plots(artifact, report)
        plot_groups(artifact, report)
    return report


def _rules_report(examples: Examples, values: np.ndarray, rules: RuleSet, n_r: int, n_p: int) -> dict:
    """Per rule: its kind, mean value over every response, and on the strict pairs how often it prefers the
    chosen reply (chosen > rejected), the rejected one, or neither."""
    strict = np.array([not p.tie for p in examples.pairs], bool)
    pairs = values[n_r : n_r + n_p]
    chosen, rejected = pairs[0::2][strict], pairs[1::2][strict]
    out = {}
    for j, (name, kind) in enumerate(rules.kinds.items()):
        row: dict = {"kind": kind, "mean": float(values[:, j].mean()), "n": len(values)}
        if len(chosen):
            row["pairs"] = {
                "prefers_chosen": float((chosen[:, j] > rejected[:, j]).mean()),
                "prefers_rejected": float((chosen[:, j] < rejected[:, j]).mean()),
                "n": len(chosen),
            }
        out[name] = row
    return out


def _json_safe(obj):
    """NaN (a correlation over constant values) becomes null: the report must be valid JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _score_sigma(scorer: Scorer, results: list[ScoreResult]) -> np.ndarray | None:
    """Each item's epistemic σ of the gated score (README, "Uncertainty"), where the artifact has it."""
    if not results or results[0].uncertainty is None or scorer.manifest.transform is None:
        return None
    rows = Recipe.build(scorer.manifest).apply(results, extras=["uncertainty"])
    return np.array([r["uncertainty"]["score"]["epistemic"] for r in rows])


def _pairs_report(examples: Examples, paired: list[ScoreResult], names: list[str], sigma) -> dict:
    if not examples.pairs:
        return {"accuracy": None, "subsets": {}, "n": 0}
    chosen, rejected = paired[0::2], paired[1::2]
    strict = np.array([not p.tie for p in examples.pairs])
    margin = np.array([c.score - r.score for c, r in zip(chosen, rejected, strict=True)])
    correct = margin > 0
    groups: dict[str, list[int]] = defaultdict(list)
    gates: dict[str, list[list[float]]] = defaultdict(list)
    for i, p in enumerate(examples.pairs):
        gates[p.dataset].append(chosen[i].gating)
        if strict[i]:
            groups[p.dataset].append(i)
            if p.subset:
                groups[_subset(p.dataset, p.subset)].append(i)
    ece, table = _ece(margin[strict])
    calibration: dict = {"ece": ece, "bins": table}
    if sigma is not None:  # the probit form: E[σ(m)] for m ~ N(margin, σ_c² + σ_r²)
        variance = sigma[0::2] ** 2 + sigma[1::2] ** 2
        probit = margin / np.sqrt(1 + np.pi * variance / 8)
        calibration["ece_with_uncertainty"] = _ece(probit[strict])[0]
    per_objective: dict[str, dict] = {}
    for k, name in enumerate(names):
        label = name.removesuffix("-pairs")  # a pair-fitted head beside a rated one (see training.pipeline)
        labelled = [i for i, p in enumerate(examples.pairs) if p.objective == label and strict[i]]
        if labelled:
            acc = np.mean([chosen[i].rewards[k] > rejected[i].rewards[k] for i in labelled])
            per_objective[name] = {
                "accuracy_own_reward": float(acc),
                "accuracy_score": float(correct[labelled].mean()),
                "n": len(labelled),
            }
    return {
        "accuracy": float(correct[strict].mean()),
        "subsets": {g: float(correct[idx].mean()) for g, idx in sorted(groups.items())},
        "subset_sizes": {g: len(idx) for g, idx in sorted(groups.items())},
        "n": int(strict.sum()),
        "ties_skipped": int((~strict).sum()),
        "pairs_by_objective": per_objective,
        "calibration": calibration,
        "gating_by_dataset": {
            d: dict(zip(names, np.mean(g, 0).tolist(), strict=True)) for d, g in sorted(gates.items())
        },
    }


def _ratings_report(examples: Examples, rated: list[ScoreResult], names: list[str], scales, scorer) -> dict:
    """Per objective: correlation and MSE with the held-out ratings, and the share of them inside the 90 %
    intervals (split-conformal where the artifact has multipliers)."""
    intervals = None
    if rated and rated[0].uncertainty is not None:
        rows = Recipe.build(scorer.manifest, space="raw").apply(
            rated, extras=["intervals"], level=COVERAGE_LEVEL
        )
        intervals = [r["intervals"]["rewards"] for r in rows]
    out = {}
    for k, name in enumerate(names):
        labels, preds, inside = [], [], []
        for i, (e, r) in enumerate(zip(examples.ratings, rated, strict=True)):
            y = e.rating(name)
            if not math.isnan(y):
                lo, hi = scales.get((e.dataset, name), (0.0, 1.0))
                labels.append((y - lo) / (hi - lo))
                preds.append(r.rewards[k])
                if intervals is not None:
                    inside.append(intervals[i][k][0] <= labels[-1] <= intervals[i][k][1])
        if labels:
            y, p = np.array(labels), np.array(preds)
            out[name] = {
                "n": len(y),
                "pearson": _corr(pearsonr, p, y),
                "spearman": _corr(spearmanr, p, y),
                "mse": float(np.mean((p - y) ** 2)),
            }
            if inside:
                out[name][f"coverage_{COVERAGE_LEVEL}"] = float(np.mean(inside))
    return out


def _bon_report(examples: Examples, bon: list[ScoreResult]) -> dict:
    if not examples.bon:
        return {}
    pos, wins, groups = 0, [], defaultdict(list)
    for i, b in enumerate(examples.bon):
        scores = [r.score for r in bon[pos : pos + 1 + len(b.losers)]]
        pos += 1 + len(b.losers)
        wins.append(all(scores[0] > s for s in scores[1:]))
        for label in {b.objective, b.subset} - {None}:
            groups[_subset(b.dataset, label)].append(i)
    w = np.array(wins)
    return {
        "accuracy": float(w.mean()),
        "n": len(w),
        "subsets": {g: float(w[idx].mean()) for g, idx in sorted(groups.items())},
    }


def _plots(artifact: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratings = report["ratings"]
    if ratings:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        names = list(ratings)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [ratings[n]["pearson"] or 0 for n in names], 0.4, label="Pearson")
        ax.bar(x + 0.2, [ratings[n]["spearman"] or 0 for n in names], 0.4, label="Spearman")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel("held-out correlation")
        ax.set_title("Per-objective correlation with held-out ratings")
        ax.legend()
        fig.tight_layout()
        fig.savefig(artifact / "objective_correlation.png", dpi=110)
        plt.close(fig)
    gates = report.get("gating_by_dataset") or {}
    if gates:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        datasets = list(gates)
        bottom = np.zeros(len(datasets))
        colors = plt.get_cmap("tab20").colors
        for k, name in enumerate(report["objectives"]):
            vals = np.array([gates[d][name] for d in datasets])
            ax.bar(datasets, vals, bottom=bottom, label=name, color=colors[k % len(colors)])
            bottom += vals
        ax.set_ylabel("mean gating weight")
        ax.set_title("Gating weights by dataset (held-out prompts)")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(artifact / "gating_by_subset.png", dpi=110)
        plt.close(fig)
    table = (report.get("calibration") or {}).get("bins") or []
    if table:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0.5, 1], [0.5, 1], "--", color="grey")
        ax.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], "o-")
        ax.set_xlabel("confidence in the predicted winner, max(p, 1 - p)")
        ax.set_ylabel("fraction correct")
        ax.set_title(f"Calibration (ECE {report['calibration']['ece']:.3f})")
        fig.tight_layout()
        fig.savefig(artifact / "calibration.png", dpi=110)
        plt.close(fig)
