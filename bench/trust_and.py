"""Goodhart under best-of-N with two objectives, for `python -m bench trust`: does the log-sigmoid AND pick
responses that are good on both?

No pool in the data rates one response on two objectives, so the second objective is predicted: on the
just_eval_safety pools (held-out prompts, 16 responses each), proxy and gold heads for `safety` (fitted on its
ratings) and for `helpfulness` (fitted on just_eval's multi-aspect ratings) score every response. Proxies use
a seeded 25 % of their training rows, golds all rows (as in `bench.trust_goodhart`). Both proxies and both
golds are z-scored with their mean and standard deviation over all pool responses (what `normalize` does with
training stats). Gold of a pick: z(gold safety) + z(gold helpfulness). Selectors, on the proxies' z-scores
x_k and epistemic σ_k (in z units), over one random subset of N responses of a pool:

    sum         Σ_k x_k
    sum − κσ    Σ_k x_k − κ √(Σ_k σ_k²)                        (the recipe's pessimism)
    AND         Σ_k log σ(x_k − mean of x_k over the subset's other responses)   (aggregate "and",
                                                                 transform.reference "group")
    min         min_k x_k                                       (aggregate "min")
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import numpy as np

from bench.trust_goodhart import KAPPAS, NS, SUBSETS, fit_heads

OBJECTIVES = ("safety", "helpfulness")
DATASET = "just_eval_safety"


def picks(x: np.ndarray, sd: np.ndarray) -> dict[str, int]:
    """Each selector's pick among one subset: x, sd [N, 2] (the proxies' z-scores and σ in z units)."""
    from polyreward.service.postprocess import log_sigmoid

    others = (x.sum(0) - x) / max(len(x) - 1, 1)
    out = {"sum": int(np.argmax(x.sum(1)))}
    out |= {f"sum − {k:g}·σe": int(np.argmax(x.sum(1) - k * np.sqrt((sd**2).sum(1)))) for k in KAPPAS}
    out["AND (log-sigmoid, group)"] = int(np.argmax(log_sigmoid(x - others).sum(1)))
    out["min"] = int(np.argmax(x.min(1)))
    return out


def run(training, pools: list[dict], seed: int = 0) -> dict:
    """The two-objective block of trust.json (gold of each selector's pick, by N, ± SE over pools)."""
    from polyreward.service.postprocess import prompt_key

    members = [p["members"] for p in pools if p["dataset"] == DATASET]
    if not members:
        return {"note": f"no {DATASET} pools"}
    ratings = training.examples.ratings
    items = [ratings[i].item for m in members for i in m]
    x_pool, _ = training.embed(items)
    proxy, gold, sd = [], [], []
    for j, objective in enumerate(OBJECTIVES):
        p_fit, g_fit = fit_heads(training, objective, seed + j)["fits"]
        p, g, s = p_fit.predict(x_pool), g_fit.predict(x_pool), p_fit.epistemic_std(x_pool)
        proxy.append((p - p.mean()) / p.std())
        sd.append(s / p.std())
        gold.append((g - g.mean()) / g.std())
    proxy, gold, sd = (np.stack(a, 1) for a in (proxy, gold, sd))
    starts = np.cumsum([0, *map(len, members)])
    rng = np.random.default_rng([seed, 99])
    by_n = {}
    for n in NS:
        per_pool: dict[str, list[float]] = defaultdict(list)
        for a, b in itertools.pairwise(starts):
            if b - a < n:
                continue
            acc: dict[str, list[float]] = defaultdict(list)
            for _ in range(SUBSETS):
                sub = rng.choice(np.arange(a, b), n, replace=False)
                for name, i in picks(proxy[sub], sd[sub]).items():
                    acc[f"gold/{name}"].append(gold[sub][i].sum())
                    for k, objective in enumerate(OBJECTIVES):
                        acc[f"gold {objective}/{name}"].append(gold[sub][i, k])
                acc["gold/oracle (best gold)"].append(gold[sub].sum(1).max())
                acc["gold/random (mean gold)"].append(gold[sub].sum(1).mean())
            for key, values in acc.items():
                per_pool[key].append(float(np.mean(values)))
        if per_pool:
            by_n[str(n)] = {
                "pools": len(next(iter(per_pool.values()))),
                **{k: {"mean": float(np.mean(v)), "se": float(np.std(v, ddof=1) / math.sqrt(len(v)))} for k, v in per_pool.items()},
            }  # fmt: skip
    correlation = float(np.corrcoef(gold[:, 0], gold[:, 1])[0, 1])
    return {
        "dataset": DATASET, "objectives": list(OBJECTIVES), "pools": len(members),
        "prompts_distinct": len({prompt_key(it) for it in items}), "gold_correlation": correlation,
        "selectors": list(picks(proxy[:2], sd[:2])), "by_n": by_n,
    }  # fmt: skip


def markdown(block: dict) -> list[str]:
    if "by_n" not in block:
        return [f"- **AND over two objectives:** {block['note']}.", ""]
    by_n, selectors = block["by_n"], block["selectors"]
    cols = [*(f"gold/{s}" for s in selectors), "gold/oracle (best gold)", "gold/random (mean gold)",
            *(f"gold {o}/{s}" for o in block["objectives"] for s in ("sum", "AND (log-sigmoid, group)"))]  # fmt: skip
    cell = lambda v: f"{v['mean']:.3f} ± {v['se']:.3f}"  # noqa: E731
    last = by_n[max(by_n, key=int)]
    best = max(selectors, key=lambda s: last[f"gold/{s}"]["mean"])
    return [
        f"### Two objectives: {' + '.join(block['objectives'])} on {block['pools']} {block['dataset']} pools",
        "",
        "No pool rates one response on two objectives, so the second is predicted: proxy and gold heads for "
        "safety (its ratings) and helpfulness (just_eval's multi-aspect ratings) score every pool response; "
        "proxies on a seeded 25 % of their training rows, golds on all rows; each z-scored over the pool "
        "responses. Gold of a pick: z(gold safety) + z(gold helpfulness). Selectors: sum Σ x_k; sum − κσ; AND Σ log σ(x_k − the mean of the subset's other responses) (the "
        "recipe's `aggregate: and` with `transform.reference: group`); min (the worst objective). Gold "
        f"correlation of the two objectives over the pool responses: {block['gold_correlation']:.3f}.",
        "",
        "| N | pools | " + " | ".join(c.replace("/", ": ") for c in cols) + " |",
        "|" + "---|" * (len(cols) + 2),
        *(f"| {n} | {r['pools']} | " + " | ".join(cell(r[c]) for c in cols) + " |" for n, r in by_n.items()),
        "",
        f"At N = {max(by_n, key=int)} the highest combined gold comes from **{best}** "
        f"({last[f'gold/{best}']['mean']:.3f}; sum {last['gold/sum']['mean']:.3f}, AND "
        f"{last['gold/AND (log-sigmoid, group)']['mean']:.3f}, oracle {last['gold/oracle (best gold)']['mean']:.3f}, "
        f"random {last['gold/random (mean gold)']['mean']:.3f}).",
        "",
    ]
