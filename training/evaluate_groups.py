"""The pluralistic part of `polyreward eval`: worst-group accuracy, how well a mixture's groups recover a hidden
label, and the few-shot curve of adapting to one group (`polyreward.models.runtime.adapt`).

The hidden label of a pair is the objective it was labelled for (RMB's `goal`: helpfulness or harmlessness;
HH harmless-base: harmlessness), which mixture training never sees. A pair's group is the router's most
probable group for its prompt; the adjusted Rand index compares the two partitions (1: the same, ~0: chance).
The few-shot curve, per hidden label with enough pairs: k of its pairs adapt the model (over objectives, and
for a mixture over groups too), and the adapted reward is scored on `EVAL_PAIRS` other pairs of that label,
against the population model on the same pairs; the mean over `REPEATS` random draws.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from polyreward.models.runtime.adapt import DEFAULT_STRENGTH, over_groups, over_objectives
from polyreward.models.runtime.manifest import Manifest
from polyreward.models.runtime.scorer import ScoreResult
from polyreward.training.data.examples import Examples

SHOTS = (4, 8, 16, 32, 64)
REPEATS = 20
EVAL_PAIRS = 500
MIN_SUBSET_PAIRS = 30


def _margins(chosen: Sequence[ScoreResult], rejected: Sequence[ScoreResult], transform: np.ndarray):
    """Per pair: Δx (debiased objectives), the population's score margin, and for mixtures the router's
    probabilities and the group score margins."""
    delta = (np.array([c.rewards for c in chosen]) - np.array([r.rewards for r in rejected])) @ transform
    score = np.array([c.score - r.score for c, r in zip(chosen, rejected, strict=True)])
    if chosen and chosen[0].group_probs is not None:
        probs = np.array([c.group_probs for c in chosen])
        groups = np.array([c.group_scores for c in chosen]) - np.array([r.group_scores for r in rejected])
        return delta, score, probs, groups
    return delta, score, None, None


def groups_report(
    examples: Examples, paired: list[ScoreResult], manifest: Manifest, subsets: dict, sizes: dict
) -> dict:
    """Worst subset and worst hidden-label accuracy, ARI and group shares per label (mixtures), few-shot curve."""
    from sklearn.metrics import adjusted_rand_score

    strict = [i for i, p in enumerate(examples.pairs) if not p.tie]
    if not strict or manifest.transform is None:
        return {}
    chosen, rejected = [paired[2 * i] for i in strict], [paired[2 * i + 1] for i in strict]
    labels = [examples.pairs[i].objective for i in strict]
    delta, score, probs, group_margins = _margins(chosen, rejected, np.array(manifest.transform))
    correct = score > 0
    by_label: dict[str, list[int]] = defaultdict(list)
    for j, label in enumerate(labels):
        if label:
            by_label[label].append(j)
    sized = {s: a for s, a in subsets.items() if sizes.get(s, 0) >= MIN_SUBSET_PAIRS}
    out: dict = {
        "accuracy_by_label": {lab: float(correct[idx].mean()) for lab, idx in sorted(by_label.items())},
        "worst_label_accuracy": min((float(correct[idx].mean()) for idx in by_label.values()), default=None),
        "worst_subset": min(sized.items(), key=lambda kv: kv[1], default=(None, None))[0],
    }
    out["worst_subset_accuracy"] = sized.get(out["worst_subset"])
    if probs is not None:
        names = manifest.head.groups or []
        labelled = [j for j, lab in enumerate(labels) if lab]
        found = probs.argmax(-1)
        out["ari"] = (
            float(adjusted_rand_score([labels[j] for j in labelled], found[labelled])) if labelled else None
        )
        out["group_share_by_label"] = {
            lab: dict(zip(names, probs[idx].mean(0).tolist(), strict=True))
            for lab, idx in sorted(by_label.items())
        }
    out["few_shot"] = few_shot(by_label, delta, score, probs, group_margins)
    return out


def few_shot(by_label, delta, score, probs, group_margins, seed: int = 0) -> dict:
    """Per hidden label with at least 2 × max(SHOTS) pairs: for each k, the held-out accuracy of the
    population model and of the reward adapted over objectives and (mixtures) over groups, on the same draws."""
    rng = np.random.default_rng(seed)
    curves = {}
    for label, idx in sorted(by_label.items()):
        idx = np.array(idx)
        if len(idx) < 2 * max(SHOTS):
            continue
        rows = []
        for k in SHOTS:
            acc = defaultdict(list)
            for _ in range(REPEATS):
                perm = rng.permutation(idx)
                shots, held = perm[:k], perm[k : k + EVAL_PAIRS]
                acc["population"].append((score[held] > 0).mean())
                offset = over_objectives(delta[shots], score[shots], DEFAULT_STRENGTH).weights
                acc["objectives"].append((score[held] + delta[held] @ offset > 0).mean())
                if probs is not None:
                    tilted = probs[held].clip(1e-12) * over_groups(group_margins[shots], probs[shots]).weights
                    acc["groups"].append(((tilted * group_margins[held]).sum(-1) > 0).mean())
            rows.append({"k": k, **{name: float(np.mean(a)) for name, a in acc.items()}})
        curves[label] = {"n": len(idx), "curve": rows}
    return curves


def plot_groups(artifact, report: dict) -> None:
    """few_shot.png (accuracy against k per hidden label) and, for mixtures, groups_by_label.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report.get("groups") or {}
    if curves := groups.get("few_shot"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, c in curves.items():
            ks = [r["k"] for r in c["curve"]]
            color = ax.plot(ks, [r["population"] for r in c["curve"]], "--", label=f"{label}: population")
            for over, marker in (("objectives", "o-"), ("groups", "s-")):
                if over in c["curve"][0]:
                    ax.plot(ks, [r[over] for r in c["curve"]], marker, color=color[0].get_color(),
                            label=f"{label}: adapted over {over}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("labelled pairs from the user (k)")
        ax.set_ylabel("held-out pair accuracy")
        ax.set_title("Few-shot adaptation to one group")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(artifact / "few_shot.png", dpi=110)
        plt.close(fig)
    if shares := groups.get("group_share_by_label"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        labels = list(shares)
        bottom = np.zeros(len(labels))
        for name in next(iter(shares.values())):
            vals = np.array([shares[lab][name] for lab in labels])
            ax.bar(labels, vals, bottom=bottom, label=name)
            bottom += vals
        ax.set_ylabel("mean router probability")
        ax.set_title(f"Groups by hidden label (ARI {groups.get('ari') or 0:.2f})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(artifact / "groups_by_label.png", dpi=110)
        plt.close(fig)
