"""`python -m bench trust`: does the model's uncertainty mean what it says? Writes docs/trust.{json,md} and plots.

1. Interval coverage of held-out ratings: split-conformal intervals (the recipe's raw-space `intervals`) vs
   Gaussian r ± z·σp and r ± z·σe, per rated objective and level.
2. Pairs: does σ_m flag wrongly ordered pairs, and does the probit σ(m / √(1 + π σ_m² / 8)) calibrate better
   than σ(m)? In distribution (held-out pairs) and shifted (USR Topical-Chat, never trained on).
3. Goodhart under best-of-N, proxy vs gold ridge heads on cached embeddings (`bench.trust_goodhart`, which
   also draws the plots and assembles trust.md). Each distinct item is scored once; every draw is seeded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

from bench.common import DATA, artifact_path, jsonl
from bench.machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (0.5, 0.8, 0.9, 0.95)
TARGET = (0.88, 0.92)  # what a 90 % interval should cover
SHIFTED = "topicalchat_usr_multiattr/topical_chat_usr.jsonl.gz"
COVERAGE_HEADER = ["objective", "n", "datasets", "conformal multipliers", "conformal", "Gaussian σp", "epistemic σe",
                   "half-width conf / Gauss / epi", "RMSE"]  # fmt: skip
PAIRS_HEADER = ["set", "pairs", "accuracy", "AUROC σ_m", "AUROC −|m|", "AUROC −|m|/σ_m", "ECE σ(m)", "ECE probit",
                "log loss σ(m)", "log loss probit", "mean |m|", "mean σ_m"]  # fmt: skip


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifact", help="artifact with uncertainty outputs (default: the shipped model)")
    parser.add_argument("--config", default=str(ROOT / "configs/default.yaml"), help="training config")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where trust.json/.md and plots go")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (Goodhart)")
    parser.add_argument(
        "--limit", type=int, help="at most this many ratings / pairs per dataset (a smoke run)"
    )


def _limited(rows: list, limit: int | None) -> list:
    """The first `limit` rows of each dataset (all of them without a limit)."""
    if limit is None:
        return rows
    by_dataset: dict[str, list] = defaultdict(list)
    for r in rows:
        by_dataset[r.dataset].append(r)
    return [r for group in by_dataset.values() for r in group[:limit]]


def shifted_set(limit: int | None = None) -> tuple[list[dict], list[tuple[int, int]]]:
    """USR Topical-Chat: the responses as PromptItem dicts (dialogue history as the user prompt) and, within each
    context, every (chosen, rejected) index pair whose mean `overall` differs (higher = chosen). `idx` numbers
    rows, not contexts (360 distinct values): a context is its `dialogue_history` (60 of them, 6 rows each)."""
    path = DATA / SHIFTED
    if not path.is_file():
        raise SystemExit(f"{path}: not found; set POLYREWARD_DATA to the shared data directory")
    rows = jsonl(path)
    items = [{"prompt": r["dialogue_history"].strip(), "response": r["response"].strip()} for r in rows]
    by_context: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_context[r["dialogue_history"]].append(i)
    pairs = []
    for members in by_context.values():
        for a, b in combinations(members, 2):
            diff = rows[a]["overall"] - rows[b]["overall"]
            if abs(diff) > 1e-6:
                pairs.append((a, b) if diff > 0 else (b, a))
    return items, pairs[: limit * 10] if limit else pairs


def _key(item) -> str:
    return json.dumps(item, sort_keys=True) if isinstance(item, dict) else item.model_dump_json()


def score_once(scorer, items: list) -> tuple[list, list[int]]:
    """Results of the distinct items (each scored once) and, per input item, its row in them."""
    index: dict[str, int] = {}
    distinct, rows = [], []
    for it in items:
        k = _key(it)
        if k not in index:
            index[k] = len(distinct)
            distinct.append(it)
        rows.append(index[k])
    return scorer.score(distinct, progress=True), rows


def coverage(manifest, ratings: list, results: list, scales: dict) -> dict:
    """Per rated objective and level: how often the held-out (scaled) label falls inside each interval."""
    from polyreward.models.runtime.uncertainty import normal_quantile
    from polyreward.service.postprocess import Recipe, RecipeSpec, prompt_key
    from polyreward.training.data.examples import scale_label

    recipe = Recipe.build(manifest, RecipeSpec(space="raw"))
    applied = {lvl: recipe.apply(results, extras=["uncertainty", "intervals"], level=lvl) for lvl in LEVELS}
    base, info, out = applied[LEVELS[0]], manifest.uncertainty or {}, {}
    for k, name in enumerate(manifest.objective_names):
        rows = [i for i, e in enumerate(ratings) if not math.isnan(e.rating(name))]
        if not rows:
            continue
        y = np.array(
            [scale_label(ratings[i].rating(name), scales.get((ratings[i].dataset, name))) for i in rows]
        )
        r = np.array([base[i]["rewards"][k] for i in rows])
        se = np.array([base[i]["uncertainty"]["epistemic"][k] for i in rows])
        sp = np.array([base[i]["uncertainty"]["predictive"][k] for i in rows])
        head = info.get(name)
        prompts = [prompt_key(ratings[i].item) for i in rows]
        entry: dict = {
            "n": len(rows), "prompts": len(set(prompts)), "datasets": sorted({ratings[i].dataset for i in rows}),
            "conformal": bool(head and head.conformal), "conformal_n": head.conformal_n if head else None,
            "residual_sd": math.sqrt(head.residual_variance) if head else None,
            "mean_sigma_epistemic": float(se.mean()), "mean_sigma_predictive": float(sp.mean()),
            "rmse": float(np.sqrt(np.mean((y - r) ** 2))), "levels": {},
        }  # fmt: skip
        for lvl in LEVELS:
            z = normal_quantile(lvl)
            iv = np.array([applied[lvl][i]["intervals"]["rewards"][k] for i in rows])
            inside = {
                "conformal": ((y >= iv[:, 0]) & (y <= iv[:, 1]), (iv[:, 1] - iv[:, 0]) / 2),
                "gaussian": (np.abs(y - r) <= z * sp, z * sp),
                "epistemic": (np.abs(y - r) <= z * se, z * se),
            }
            entry["levels"][str(lvl)] = {
                m: {"coverage": float(hit.mean()), "se": _clustered_se(hit, prompts), "half_width": float(half.mean())}
                for m, (hit, half) in inside.items()
            }  # fmt: skip
        out[name] = entry
    return out


def _clustered_se(hit: np.ndarray, clusters: list) -> float:
    """Standard error of a coverage rate with the rows of one prompt counted as one draw (their errors move
    together); with one row per prompt it is the binomial one."""
    dev: dict = defaultdict(float)
    for h, c in zip(hit, clusters, strict=True):
        dev[c] += h - hit.mean()
    k = len(dev)
    return float(math.sqrt(k / max(k - 1, 1) * sum(d * d for d in dev.values())) / len(hit))


def pair_stats(m: np.ndarray, s: np.ndarray) -> dict:
    """Accuracy, AUROC of uncertainty signals for flagging wrong pairs (m ≤ 0), ECE and log loss of σ(m)
    vs the probit, for margins m and their standard deviations s."""
    from sklearn.metrics import roc_auc_score

    from polyreward.service.postprocess import margin_probability, sigmoid
    from polyreward.training.evaluate import _ece

    wrong = m <= 0
    probit = m / np.sqrt(1 + math.pi * s**2 / 8)  # the logit of margin_probability(m, s²)
    p = np.array([margin_probability(a, b * b) for a, b in zip(m, s, strict=True)])
    assert np.allclose(sigmoid(probit), p), "probit logit disagrees with margin_probability"

    def auroc(signal):
        return float(roc_auc_score(wrong, signal)) if 0 < wrong.sum() < len(m) else None

    def hanley_mcneil(a: float | None) -> float | None:
        n1, n0 = int(wrong.sum()), int((~wrong).sum())
        if a is None:
            return None
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        return math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))

    def log_loss(logit):
        return float(np.mean(np.logaddexp(0, -logit)))  # every pair's label is "chosen wins"

    (ece_s, bins_s), (ece_p, bins_p) = _ece(m), _ece(probit)
    return {
        "n": len(m), "accuracy": float((~wrong).mean()), "mean_abs_margin": float(np.abs(m).mean()),
        "mean_sigma_m": float(s.mean()),
        "auroc": {"sigma_m": auroc(s), "sigma_m_se": hanley_mcneil(auroc(s)), "neg_abs_margin": auroc(-np.abs(m)),
                  "neg_abs_margin_over_sigma": auroc(-np.abs(m) / np.maximum(s, 1e-12))},
        "ece": {"sigmoid": ece_s, "probit": ece_p}, "log_loss": {"sigmoid": log_loss(m), "probit": log_loss(probit)},
        "bins": {"sigmoid": bins_s, "probit": bins_p},
    }  # fmt: skip


def run(args) -> dict:
    from bench import trust_goodhart
    from polyreward.models.runtime.scorer import Scorer
    from polyreward.service.postprocess import Recipe, RecipeSpec
    from polyreward.training.config import load_config
    from polyreward.training.pipeline import Run

    started, load_start = time.time(), round(os.getloadavg()[0], 2)
    artifact = artifact_path(args.artifact)
    training = Run(load_config(args.config), progress=False)
    test = training.examples.where("test")
    ratings = _limited(test.ratings, args.limit)
    pairs = _limited([p for p in test.pairs if not p.tie], args.limit)
    shifted_items, shifted_pairs = shifted_set(args.limit)
    scorer = Scorer(artifact, precision="fp32", device="cpu")
    manifest = scorer.manifest
    if not manifest.uncertainty or not any(u.conformal for u in manifest.uncertainty.values()):
        print(f"warning: {artifact} records no conformal multipliers; conformal = Gaussian", file=sys.stderr)
    items = [e.item for e in ratings] + [it for p in pairs for it in p.items] + shifted_items
    results, rows = score_once(scorer, items)
    scored = time.time()

    n_r, n_p = len(ratings), 2 * len(pairs)
    report: dict = {
        "artifact": str(artifact), "model": manifest.name, "version": manifest.version, "created": manifest.created,
        "config": str(args.config), "distinct_items_scored": len(results),
        "coverage": coverage(manifest, ratings, [results[i] for i in rows[:n_r]], training.scales()),
    }  # fmt: skip
    default = Recipe.build(manifest, RecipeSpec()).apply(results, extras=["uncertainty"])
    score = np.array([d["score"] for d in default])
    sigma = np.array([d["uncertainty"]["score"]["epistemic"] for d in default], np.float64)
    if np.isnan(sigma).any():
        raise SystemExit(f"{artifact}: the gated score's σ is unknown (no transform in the manifest)")

    def margins(chosen: list[int], rejected: list[int]) -> tuple[np.ndarray, np.ndarray]:
        return score[chosen] - score[rejected], np.hypot(sigma[chosen], sigma[rejected])

    pair_rows = rows[n_r : n_r + n_p]
    sets = {"in-distribution (all)": margins(pair_rows[0::2], pair_rows[1::2])}
    for dataset in sorted({p.dataset for p in pairs}):
        idx = [i for i, p in enumerate(pairs) if p.dataset == dataset]
        sets[f"in-distribution: {dataset}"] = margins(
            [pair_rows[2 * i] for i in idx], [pair_rows[2 * i + 1] for i in idx]
        )
    shifted_rows = rows[n_r + n_p :]
    sets["shifted: topical-chat"] = margins(
        [shifted_rows[c] for c, _ in shifted_pairs], [shifted_rows[r] for _, r in shifted_pairs]
    )
    report["pairs"] = {name: pair_stats(m, s) for name, (m, s) in sets.items()}
    report["goodhart"] = trust_goodhart.run(training, seed=args.seed)
    report["machine"] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
        "load_average_1min": load_start,
        "scoring_seconds": round(scored - started, 1), "total_seconds": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    report["command"] = "python -m bench trust " + " ".join(args.argv)
    return report


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def coverage_markdown(cov: dict) -> list[str]:
    def se(v: dict) -> str:
        return f"{_pct(v['coverage'])} ± {100 * v['se']:.1f}"

    rows, hits = [], 0
    for name, e in cov.items():
        at = e["levels"]["0.9"]
        conf = at["conformal"]["coverage"]
        hits += e["conformal"] and TARGET[0] <= conf <= TARGET[1]
        rows.append([
            name, f"{e['n']} ({e['prompts']})", ", ".join(e["datasets"]),
            f"yes (n={e['conformal_n']})" if e["conformal"] else f"none (n={e['conformal_n']}, too few): Gaussian",
            se(at["conformal"]) if e["conformal"] else "–", se(at["gaussian"]), se(at["epistemic"]),
            f"{_f(at['conformal']['half_width'])} / {_f(at['gaussian']['half_width'])} / {_f(at['epistemic']['half_width'])}",
            _f(e["rmse"]),
        ])  # fmt: skip
    conformal = [n for n, e in cov.items() if e["conformal"]]
    lines = [
        f"**Goal: 90 % intervals cover {TARGET[0]:.2f}–{TARGET[1]:.2f} of held-out ratings.** Conformal 90 % "
        f"intervals land in that band for {hits} of the {len(conformal)} objectives that carry multipliers. "
        "n: held-out rows (prompts); ± is one standard error with each prompt's rows as one draw (a prompt's "
        "responses share their errors; with one response per prompt it is the binomial SE). Half-widths are in "
        "label units (labels scaled to [0, 1]).",
        "",
        *_table(COVERAGE_HEADER, rows),
        "",
        "All levels (coverage; conformal / Gaussian σp / epistemic σe):",
        "",
    ]
    header = ["objective", *(f"{lvl:g}" for lvl in LEVELS)]
    body = [
        [name, *(" / ".join(_pct(e["levels"][str(lvl)][m]["coverage"]) for m in ("conformal", "gaussian", "epistemic"))
                 for lvl in LEVELS)]
        for name, e in cov.items()
    ]  # fmt: skip
    return [*lines, *_table(header, body), "", "![coverage](trust-coverage.png)", ""]


def pairs_markdown(sets: dict) -> list[str]:
    rows = [
        [name, str(s["n"]), _pct(s["accuracy"]), _f(s["auroc"]["sigma_m"]), _f(s["auroc"]["neg_abs_margin"]),
         _f(s["auroc"]["neg_abs_margin_over_sigma"]), _f(s["ece"]["sigmoid"]), _f(s["ece"]["probit"]),
         _f(s["log_loss"]["sigmoid"]), _f(s["log_loss"]["probit"]), _f(s["mean_abs_margin"]), _f(s["mean_sigma_m"])]
        for name, s in sets.items()
    ]  # fmt: skip
    ind, sh = sets["in-distribution (all)"], sets["shifted: topical-chat"]
    caveat = (
        f" The shifted set's accuracy is {_pct(sh['accuracy'])}: near chance, pulling every p toward ½ lowers ECE, "
        "so a lower ECE there can come from shrinking alone; the AUROC of σ_m says how well σ_m tells hard pairs apart."
    ) if sh["accuracy"] < 0.6 else ""  # fmt: skip

    def verdict(s: dict, where: str) -> str:
        a, b = s["ece"]["sigmoid"], s["ece"]["probit"]
        return f"{where} the probit {'lowers' if b < a else 'does not lower'} ECE ({a:.3f} → {b:.3f})"

    def flag(s: dict) -> str:
        a = s["auroc"]
        return "not defined" if a["sigma_m"] is None else (
            f"{a['sigma_m']:.3f} ± {a['sigma_m_se']:.3f} (Hanley–McNeil SE; −|m|: {a['neg_abs_margin']:.3f}, "
            f"−|m|/σ_m: {a['neg_abs_margin_over_sigma']:.3f})")  # fmt: skip

    return [
        "m = score(chosen) − score(rejected) under the default recipe (the model's gated score), σ_m = "
        "hypot of the two items' `uncertainty.score.epistemic`. A pair is wrong when m ≤ 0. AUROC: how well each "
        "signal ranks wrong pairs above right ones (0.5 = chance). ECE: 10 equal-width bins of max(p, 1 − p) "
        "over [0.5, 1] (`training.evaluate._ece`); p = σ(m) vs the probit p = σ(m / √(1 + π σ_m² / 8)) "
        "(`margin_probability(m, σ_m²)`), which needs no fitted temperature. Log loss: −log p(chosen).",
        "",
        *_table(PAIRS_HEADER, rows),
        "",
        f"- **Temperature-free comparison:** {verdict(sh, 'on the shifted set')}; {verdict(ind, 'in distribution')}."
        + caveat,
        f"- σ_m as a flag for wrongly ordered pairs: AUROC {flag(ind)} in distribution, {flag(sh)} shifted. "
        "The SE treats pairs as independent; the shifted pairs reuse 360 responses of 60 contexts, so it is "
        "optimistic there.",
        "",
        "![reliability](trust-reliability.png)",
        "",
    ]


def main(argv: list[str]) -> None:
    from bench import trust_goodhart

    parser = argparse.ArgumentParser(prog="python -m bench trust", description=__doc__)
    add_args(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    (args.out / "trust.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    trust_goodhart.plots(report, args.out, LEVELS, TARGET)
    trust_goodhart.write_markdown(report, args.out)
    print(f"wrote {args.out / 'trust.md'}, trust.json and trust-*.png in {report['machine']['total_seconds']:.0f}s",
          file=sys.stderr)  # fmt: skip
