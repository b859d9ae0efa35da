"""Goodhart under best-of-N, for `python -m bench trust`: a proxy reward picks the best of N responses, a gold
reward judges the pick. Also where trust.md is assembled and the plots of every section are drawn.

Both are ridge heads (`training.stage1.fit_ridge_cv`) on the cached reward embeddings of the training config:
the proxy on a seeded random 25 % of the objective's *training* rows, the gold on all its rows, train and test
(so the gold has seen the pools' own labels: it stands in for the true reward). Pools are held-out prompts with
at least 4 rated responses (just_eval_safety, prometheus); for N = 1, 2, 4, …, up to the pool size, 20 seeded
random subsets per pool and N. Selectors: the proxy mean, and the pessimistic proxy − κ·σe for each κ.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

NS = (1, 2, 4, 8, 16)
KAPPAS = (1.0, 2.0)
SUBSETS = 20
PROXY_FRACTION = 0.25
MIN_POOL = 4
POOL_DATASETS = ("just_eval_safety", "prometheus")


def pools(examples, objectives: list[str]) -> tuple[list[dict], int]:
    """Held-out prompts with ≥ MIN_POOL rated responses: rating-row indices and the objectives every response
    has; also how many prompts were skipped for having responses on both sides of the split."""
    from polyreward.service.postprocess import prompt_key

    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, e in enumerate(examples.ratings):
        if e.dataset in POOL_DATASETS:
            groups[(e.dataset, prompt_key(e.item))].append(i)
    out, mixed = [], 0
    for (dataset, _), members in groups.items():
        splits = {examples.ratings[i].split for i in members}
        if len(members) < MIN_POOL or "test" not in splits:
            continue
        if splits != {"test"}:
            mixed += 1
            continue
        rated = [n for n in objectives if all(not math.isnan(examples.ratings[i].rating(n)) for i in members)]
        out.append({"dataset": dataset, "members": members, "objectives": rated})
    return out, mixed


def fit_heads(training, objective: str, seed: int) -> dict:
    """Proxy and gold ridge heads for one objective (`fits`), and their predictions for every row rating it."""
    from scipy.stats import spearmanr

    from polyreward.training.data import subsplit
    from polyreward.training.data.examples import scale_label
    from polyreward.training.stage1 import fit_ridge_cv

    ratings = training.examples.ratings
    scales = training.scales()
    index = [i for i, e in enumerate(ratings) if not math.isnan(e.rating(objective))]
    rows = [ratings[i] for i in index]
    x, _ = training.embed([e.item for e in rows])
    y = np.array([scale_label(e.rating(objective), scales.get((e.dataset, objective))) for e in rows])
    train = np.array([e.split == "train" for e in rows])
    val = np.array([subsplit(e.id, training.cfg.stage1.validation, "stage1") for e in rows])
    rank = training.cfg.stage1.uncertainty_rank
    train_idx = np.flatnonzero(train)
    rng = np.random.default_rng(seed)
    proxy_idx = np.sort(rng.choice(train_idx, size=round(PROXY_FRACTION * len(train_idx)), replace=False))
    proxy = fit_ridge_cv(x[proxy_idx], y[proxy_idx], val[proxy_idx], rank=rank)
    gold = fit_ridge_cv(x, y, val, rank=rank)
    p, g = proxy.predict(x), gold.predict(x)
    test = ~train

    def rho(a, b) -> float | None:
        v = float(spearmanr(a, b).statistic) if len(a) > 2 else math.nan
        return v if math.isfinite(v) else None

    return {
        "fits": (proxy, gold),
        "row": {i: j for j, i in enumerate(index)},
        "proxy": p, "proxy_sd": proxy.epistemic_std(x), "gold": g, "label": y,
        "info": {
            "rows": len(rows), "train_rows": int(train.sum()), "proxy_rows": len(proxy_idx),
            "proxy_alpha": proxy.alpha, "gold_alpha": gold.alpha,
            "test_spearman_proxy_vs_label": rho(p[test], y[test]),
            "test_spearman_gold_vs_label": rho(g[test], y[test]),
            "test_spearman_proxy_vs_gold": rho(p[test], g[test]),
        },
    }  # fmt: skip


def best_of_n(heads: dict, pool_rows: list[list[int]], rng: np.random.Generator) -> dict:
    """Per N: gold and label of each selector's pick, mean over subsets then over pools (± SE over pools)."""
    selectors = ["proxy mean", *(f"proxy − {k:g}·σe" for k in KAPPAS)]
    out = {}
    for n in NS:
        usable = [r for r in pool_rows if len(r) >= n]
        if not usable:
            break
        per_pool: dict[str, list[float]] = defaultdict(list)
        for rows in usable:
            r = np.array(rows)
            acc: dict[str, list[float]] = defaultdict(list)
            for _ in range(SUBSETS):
                sub = rng.choice(r, n, replace=False)
                proxy, sd, gold, label = (heads[k][sub] for k in ("proxy", "proxy_sd", "gold", "label"))
                picks = {"proxy mean": int(np.argmax(proxy))}
                picks |= {f"proxy − {k:g}·σe": int(np.argmax(proxy - k * sd)) for k in KAPPAS}
                for name, i in picks.items():
                    acc[f"gold/{name}"].append(gold[i])
                    acc[f"label/{name}"].append(label[i])
                    if name != "proxy mean":  # paired with the proxy mean's pick on the same subset
                        acc[f"gain over proxy mean/{name}"].append(gold[i] - gold[picks["proxy mean"]])
                acc["proxy estimate/proxy mean"].append(proxy[picks["proxy mean"]])
                acc["gold/oracle (best gold)"].append(gold.max())
                acc["gold/random (mean gold)"].append(gold.mean())
                acc["label/random (mean label)"].append(label.mean())
            for key, values in acc.items():
                per_pool[key].append(float(np.mean(values)))
        out[str(n)] = {
            "pools": len(usable),
            **{k: {"mean": float(np.mean(v)), "se": float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None}
               for k, v in per_pool.items()},
        }  # fmt: skip
    return {"selectors": selectors, "by_n": out}


def run(training, seed: int = 0) -> dict:
    """The Goodhart section of trust.json."""
    from tqdm import tqdm

    from bench import trust_and

    names = training.rating_objectives()
    found, mixed = pools(training.examples, names)
    blocks = {}
    keys = sorted({(p["dataset"], o) for p in found for o in p["objectives"]})
    for j, (dataset, objective) in enumerate(tqdm(keys, desc="goodhart", unit="objective")):
        heads = fit_heads(training, objective, seed)
        pool_rows = [[heads["row"][i] for i in p["members"]] for p in found
                     if p["dataset"] == dataset and objective in p["objectives"]]  # fmt: skip
        result = best_of_n(heads, pool_rows, np.random.default_rng([seed, j]))
        pool_gold = np.concatenate([heads["gold"][r] for r in pool_rows])
        pool_label = np.concatenate([heads["label"][r] for r in pool_rows])
        blocks[f"{dataset}/{objective}"] = {
            "pools": len(pool_rows), "pool_sizes": sorted({len(r) for r in pool_rows}), **heads["info"],
            "pool_gold_mean": float(pool_gold.mean()), "pool_label_mean": float(pool_label.mean()),
            "pool_gold_label_corr": _corr(pool_gold, pool_label),
            "pool_label_at_top": float(np.mean(pool_label >= pool_label.max() - 1e-9)),
            **result,
        }  # fmt: skip
    return {
        "seed": seed, "subsets": SUBSETS, "proxy_fraction": PROXY_FRACTION, "kappas": list(KAPPAS),
        "min_pool": MIN_POOL, "skipped_mixed_split_prompts": mixed, "objectives": blocks,
        "and": trust_and.run(training, found, seed),
    }  # fmt: skip


def markdown(g: dict) -> list[str]:
    from bench import trust_and

    parts = [
        "## 3. Goodhart under best-of-N",
        "",
        f"Proxy: a ridge head fitted on a seeded random {100 * g['proxy_fraction']:.0f} % of the objective's "
        "training rows. Gold: a ridge head fitted on all its rows, train **and** test — a choice: the gold has "
        "seen the pools' own labels, so it stands in for the true reward better than any held-out head could "
        "(the pools' real labels are reported beside it). Both on the cached reward embeddings "
        "(`Run.embed`, `fit_ridge_cv`, rank 64). Pools: held-out prompts with ≥ "
        f"{g['min_pool']} rated responses; per N, {g['subsets']} seeded random subsets of each pool, averaged over "
        "subsets and then pools (± one standard error over pools). Selectors pick the response with the "
        "highest proxy mean, or the highest proxy − κ·σe (σe the proxy head's epistemic σ). Oracle: the best gold "
        "in the subset; random: its mean; gain: a pessimistic pick's gold minus the proxy mean's pick's on the same "
        f"subset (paired). Seed {g['seed']}.",
        "",
        "Caveat: proxy and gold are the same model class on the same embeddings and differ only in data, so the "
        "proxy's errors are largely the gold's errors too; this understates Goodhart next to a gold from another "
        "model or from people, which is why the pools' own labels are reported beside the gold.",
        "",
    ]
    for name, b in g["objectives"].items():
        by_n = b["by_n"]
        cols = [*(f"gold/{s}" for s in b["selectors"]), "gold/oracle (best gold)", "gold/random (mean gold)",
                "proxy estimate/proxy mean", *(f"gain over proxy mean/{s}" for s in b["selectors"][1:]),
                *(f"label/{s}" for s in b["selectors"]), "label/random (mean label)"]  # fmt: skip
        header = ["N", "pools", *(c.replace("/", ": ") for c in cols)]

        def cell(v):
            return (
                "–"
                if v is None
                else (f"{v['mean']:.3f}" + (f" ± {v['se']:.3f}" if v["se"] is not None else ""))
            )

        rows = [[n, str(r["pools"]), *(cell(r.get(c)) for c in cols)] for n, r in by_n.items()]
        last, first = by_n[max(by_n, key=int)], by_n["1"]
        best = max(b["selectors"], key=lambda s: last[f"gold/{s}"]["mean"])
        parts += [
            f"### {name}: {b['pools']} pools of {'/'.join(map(str, b['pool_sizes']))} responses",
            "",
            f"Proxy on {b['proxy_rows']} of {b['train_rows']} training rows; gold on all {b['rows']}. Held-out "
            f"Spearman: proxy vs label {_f(b['test_spearman_proxy_vs_label'])}, gold vs label "
            f"{_f(b['test_spearman_gold_vs_label'])}, proxy vs gold {_f(b['test_spearman_proxy_vs_gold'])}; "
            f"gold vs label on the pools: Pearson {_f(b['pool_gold_label_corr'])}; "
            f"{100 * b['pool_label_at_top']:.0f} % of the pools' responses have the highest label of any of them.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows),
            "",
            f"At N = {max(by_n, key=int)} the highest gold comes from **{best}** ({last[f'gold/{best}']['mean']:.3f}"
            f"; proxy mean {last['gold/proxy mean']['mean']:.3f}, oracle {last['gold/oracle (best gold)']['mean']:.3f}, "
            f"random {last['gold/random (mean gold)']['mean']:.3f}); paired gold gain of pessimism over the proxy "
            "mean: "
            + ", ".join(f"{s} {cell(last[f'gain over proxy mean/{s}'])}" for s in b["selectors"][1:])
            + ". Gold of the pick peaks at N = "
            + ", ".join(
                f"{max(by_n, key=lambda n, s=s: by_n[n][f'gold/{s}']['mean'])} ({s})" for s in b["selectors"]
            )
            + f"; from N = 1 to {max(by_n, key=int)} the proxy's estimate of its own pick rises by "
            f"{last['proxy estimate/proxy mean']['mean'] - first['proxy estimate/proxy mean']['mean']:+.3f} and its "
            f"gold by {last['gold/proxy mean']['mean'] - first['gold/proxy mean']['mean']:+.3f} (a gap that widens "
            "with N is over-optimization of the proxy).",
            "",
        ]
    return [*parts, *trust_and.markdown(g["and"]), "![goodhart](trust-goodhart.png)", ""]


def _corr(a: np.ndarray, b: np.ndarray) -> float | None:
    return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else None


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def plot(g: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    two = {f"{' + '.join(g['and']['objectives'])} (z units)": g["and"]} if "by_n" in g["and"] else {}
    blocks = {**g["objectives"], **two}
    fig, axes = plt.subplots(1, max(1, len(blocks)), figsize=(5 * max(1, len(blocks)), 3.8), squeeze=False)
    for ax, (name, b) in zip(axes.flat, blocks.items(), strict=False):
        ns = [int(n) for n in b["by_n"]]
        lines = [*(f"gold/{s}" for s in b["selectors"]), "gold/oracle (best gold)", "gold/random (mean gold)",
                 "proxy estimate/proxy mean"]  # fmt: skip
        lines = [k for k in lines if k in b["by_n"][str(ns[0])]]
        for key in lines:
            mean = np.array([b["by_n"][str(n)][key]["mean"] for n in ns])
            se = np.array([b["by_n"][str(n)][key]["se"] or 0.0 for n in ns])
            style = ":" if "oracle" in key or "random" in key or "estimate" in key else "-"
            label = key.split("/", 1)[1] if key.startswith("gold") else "proxy's own estimate of its pick"
            ax.plot(ns, mean, style, marker="o", label=label)
            ax.fill_between(ns, mean - se, mean + se, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N (best of N)")
        ax.set_ylabel("gold reward of the pick (scaled label units)")
        ax.set_title(f"{name} ({b['pools']} pools)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plots(report: dict, out, levels, target) -> None:
    """trust-coverage.png, trust-reliability.png and trust-goodhart.png (the plots of all three sections)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cov = report["coverage"]
    cols = min(4, len(cov))
    fig, axes = plt.subplots(math.ceil(len(cov) / cols), cols, figsize=(3 * cols, 2.8 * math.ceil(len(cov) / cols)),
                             squeeze=False)  # fmt: skip
    for ax, (name, e) in zip(axes.flat, cov.items(), strict=False):
        for method, style in (("conformal", "o-"), ("gaussian", "s--"), ("epistemic", "^:")):
            ax.plot(
                levels, [e["levels"][str(lvl)][method]["coverage"] for lvl in levels], style, label=method
            )
        ax.plot([0.4, 1], [0.4, 1], color="gray", lw=0.8)
        ax.axhspan(*target, color="green", alpha=0.15)
        ax.set_title(f"{name} (n={e['n']})", fontsize=9)
        ax.set_xlabel("nominal level", fontsize=8)
        ax.set_ylabel("coverage", fontsize=8)
    for ax in list(axes.flat)[len(cov) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trust-coverage.png", dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, name in zip(axes, ("in-distribution (all)", "shifted: topical-chat"), strict=True):
        s = report["pairs"][name]
        for kind, style in (("sigmoid", "o-"), ("probit", "s--")):
            bins = s["bins"][kind]
            line = ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style[1:],
                           label=f"{kind} (ECE {s['ece'][kind]:.3f}; marker area ∝ pairs)")  # fmt: skip
            ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker=style[0],
                       s=[8 + 400 * b["n"] / s["n"] for b in bins], color=line[0].get_color())  # fmt: skip
        ax.plot([0.5, 1], [0.5, 1], color="gray", lw=0.8)
        ax.set_title(f"{name}, {s['n']} pairs", fontsize=9)
        ax.set_xlabel("confidence max(p, 1 − p)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "trust-reliability.png", dpi=110)
    plot(report["goodhart"], out / "trust-goodhart.png")
    plt.close("all")


def write_markdown(report: dict, out) -> None:
    """trust.md: every section's tables, generated from the report (trust.json)."""
    from bench.trust import coverage_markdown, pairs_markdown

    m = report["machine"]
    parts = [
        "# Trust: does the uncertainty mean what it says?",
        "",
        f"Generated by `{report['command']}` on {m['date']} in {m['total_seconds'] / 60:.1f} minutes "
        f"({m['scoring_seconds'] / 60:.1f} of them loading data and scoring {report['distinct_items_scored']} "
        f"distinct items once, fp32 ONNX on the CPU). Model `{report['model']}` {report['version']} (exported "
        f"{report['created']}) from `{report['artifact']}`, data from `{report['config']}` (its held-out split). All numbers: `trust.json`; "
        "these tables are generated from it.",
        "",
        f"**Machine:** {m['cpu']}, {m['cores']} cores, Python {m['python']}. 1-minute load average just before "
        f"the run: {m['load_average_1min']} (about 0 on an idle machine, {m['cores']} when other work keeps every "
        "core busy, which slows the run down).",
        "",
        "## 1. Interval coverage on held-out ratings",
        "",
        "Raw space (the heads' outputs, labels scaled to [0, 1] by the dataset's declared scale). Conformal: the "
        "recipe's `intervals` (space `raw`), r ± q(l)·σp with the split-conformal multipliers stored in the "
        "manifest (objectives without multipliers fall back to Gaussian there). Gaussian: r ± z·σp with "
        "σp² = σe² + s² (s² the head's residual variance). Epistemic: r ± z·σe alone.",
        "",
        *coverage_markdown(report["coverage"]),
        "## 2. Pairs: margin uncertainty and calibration",
        "",
        "In distribution: the config's held-out non-tie pairs. Shifted: USR Topical-Chat (open-domain "
        "knowledge-grounded chit-chat, never trained on): within each of the 60 contexts (the rows sharing a "
        "`dialogue_history`; the file's `idx` numbers rows, not contexts) every pair of the 6 responses whose "
        "mean human `overall` differs, higher = chosen; the dialogue history is the user message, the response "
        "the assistant reply.",
        "",
        *pairs_markdown(report["pairs"]),
        *markdown(report["goodhart"]),
    ]
    (out / "trust.md").write_text("\n".join(parts))
