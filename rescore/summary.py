"""The end-of-run summary: agreement with the existing labels overall and per subset, per-objective agreement,
best-of-N accuracy, and a histogram of score margins (PNG)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from polyreward.rescore.run import RUN_FILE, read_output

SUMMARY_FILE = "summary.json"
MARGINS_PNG = "margins.png"


def _rows(out: Path) -> list[dict]:
    data = read_output(out)
    return data if isinstance(data, list) else data.to_pylist()


def summarize(out: str | Path) -> dict:
    """Compute the summary of a finished run, save it as summary.json (and margins.png) and return it."""
    out = Path(out)
    manifest = json.loads((out / RUN_FILE).read_text())
    rows = _rows(out)
    summary: dict = {
        "rows": len(rows),
        "model": manifest["model"],
        "seconds": sum(s["seconds"] for s in manifest["shards"]),
    }
    summary["rows_per_s"] = round(len(rows) / summary["seconds"], 2) if summary["seconds"] else None
    summary["skipped"] = manifest.get("skipped", {})  # input rows the adapters left out, by reason
    pairs = [r for r in rows if "margin" in r]
    if pairs:
        labelled = [r for r in pairs if r["agrees"] is not None]
        by_subset: dict[str, list[bool]] = defaultdict(list)
        for r in labelled:
            by_subset[r["subset"] or "(none)"].append(r["agrees"])
        objectives = manifest["model"]["objectives"]
        summary["pairs"] = {
            "n": len(pairs),
            "ties": len(pairs) - len(labelled),
            "accuracy": float(np.mean([r["agrees"] for r in labelled])) if labelled else None,
            "per_subset": {
                k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(by_subset.items())
            },
            # How often each objective's own reward prefers the labelled choice.
            "objective_agreement": {
                o: float(np.mean([r["chosen_rewards"][o] > r["rejected_rewards"][o] for r in labelled]))
                for o in objectives
            }
            if labelled
            else {},
            "margin": _describe(np.array([r["margin"] for r in pairs])),
        }
        _histogram(np.array([r["margin"] for r in pairs]), out / MARGINS_PNG)
    bon = [r for r in rows if "best_wins" in r]
    if bon:
        summary["bon"] = {"n": len(bon), "accuracy": float(np.mean([r["best_wins"] for r in bon]))}
    ratings = [r for r in rows if "response_score" in r]
    if ratings:
        summary["ratings"] = {
            "n": len(ratings),
            "score": _describe(np.array([r["response_score"] for r in ratings])),
        }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _describe(values: np.ndarray) -> dict:
    q = np.quantile(values, [0.05, 0.5, 0.95])
    return {"mean": float(values.mean()), "std": float(values.std()), "p5": q[0], "p50": q[1], "p95": q[2]}


def _histogram(margins: np.ndarray, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # plots are optional (the `train` extra has matplotlib)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(margins, bins=60, color="#4477aa")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("score(chosen) - score(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(f"score margins ({(margins > 0).mean():.1%} of {len(margins)} pairs > 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
