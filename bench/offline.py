"""Offline scoring: `Scorer` (fp32, int8) vs a PyTorch eager baseline, same items, same run.

The baseline is what a few lines of transformers do (and OpenRLHF's serve_rm): the same backbone and heads,
batches of 32 in arrival order, each padded to its longest item. Items are both sides of real RMB pairs (their
real length mix). Each engine also scores held-out UltraFeedback test pairs for pairwise accuracy, and the
Scorers are checked for agreement with PyTorch (Spearman) and for scores that do not depend on the batch.
Useful GFLOP/s counts 2 × non-embedding parameters × real tokens.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from bench.common import (
    accuracy,
    add_common,
    artifact_path,
    emit,
    heldout_pairs,
    pair_items,
    rmb_pairs,
    scorer_settings,
)  # fmt: skip
from bench.machine import cpu_model, gemm_gflops


def add_args(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--pairs", type=int, default=128, help="RMB pairs to time (2 items each)")
    parser.set_defaults(repeats=5)
    parser.add_argument("--heldout", type=int, default=1000, help="held-out RMB pairs for accuracy (Scorers)")


def torch_baseline(artifact: Path):
    """(score(items) -> scores, non-embedding parameter count) of transformers + the same heads, batches of 32."""
    from polyreward.models.runtime.artifact import HEADS_FILE, load_manifest
    from polyreward.models.runtime.scorer import Scorer
    from polyreward.models.torch.heads import load_heads
    from polyreward.models.torch.reward_model import build_reward_model, load_backbone, score_torch

    manifest = load_manifest(artifact)
    tokenizer_side = Scorer(artifact, precision="fp32", device="cpu")  # the same tokenization and templates
    _, backbone, _ = load_backbone(manifest.backbone.id)
    model = build_reward_model(backbone, load_heads(artifact / HEADS_FILE), manifest.backbone.kind)
    params = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)

    def score(items):
        encoded = tokenizer_side.tokenize(items)
        out = []
        for start in range(0, len(encoded), 32):
            out += score_torch(model, encoded[start : start + 32], pad_id=tokenizer_side.builder.pad_id)[
                "score"
            ].tolist()
        return out

    return score, params


def batch_spread(scorer, items) -> float:
    """Largest |score in a batch − score alone| over the items: 0 up to float noise when batches don't matter."""
    together = [r.score for r in scorer.score(items)]
    return max(abs(scorer.score([it])[0].score - s) for it, s in zip(items, together, strict=True))


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per engine, the engines taking turns (one warm-up each, then round after round), so a
    noisy neighbour on a shared machine slows every engine alike instead of whichever ran at the time."""
    import statistics
    import time

    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args) -> list[dict]:
    import torch
    from scipy.stats import spearmanr

    from polyreward.models.runtime.scorer import Scorer

    artifact = artifact_path(args.artifact)
    items = pair_items(rmb_pairs(args.pairs))
    heldout = pair_items(heldout_pairs(args.heldout))
    settings = scorer_settings(args.config)
    torch_score, params = torch_baseline(artifact)
    # The gating cache is off: every round scores the same items, which it would turn into no prompt pass at
    # all (the baseline runs them every time); `bench grpo` measures the cache.
    scorers = {
        p: Scorer(artifact, precision=p, device="cpu", gating_cache=0, **settings) for p in ("fp32", "int8")
    }
    tokens = sum(e.tokens for e in scorers["fp32"].tokenize(items))
    gemm = gemm_gflops()
    common = {
        "workload": "offline", "items": len(items), "real_tokens": tokens, "source": "rmb pairwise, both sides",
        "cpu": cpu_model(), "cores": os.cpu_count(), "gemm_gflops": round(gemm, 1),
        "non_embedding_params": params, "settings": settings or "defaults", "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    engines = {"pytorch-eager-b32": torch_score} | {
        f"scorer-{p}": (lambda its, s=s: [r.score for r in s.score(its)]) for p, s in scorers.items()
    }
    reference = torch_score(items)  # also the baseline's warm-up
    seconds = interleaved(
        {name: (lambda score=score: score(items)) for name, score in engines.items()}, args.repeats
    )
    base = seconds["pytorch-eager-b32"]
    records, fp32_accuracy = [], None
    for name, score in engines.items():
        record = {
            **common, "engine": name, "seconds": round(seconds[name], 3),
            "items_per_s": round(len(items) / seconds[name], 2), "tokens_per_s": round(tokens / seconds[name]),
            "useful_gflops": round(2 * params * tokens / seconds[name] / 1e9, 1),
            "gemm_pct": round(100 * 2 * params * tokens / seconds[name] / 1e9 / gemm, 1),
            "speedup_vs_pytorch": round(base / seconds[name], 2),
            "spearman_vs_pytorch": round(float(spearmanr(reference, score(items))[0]), 4),
        }  # fmt: skip
        if name.startswith("scorer-"):  # PyTorch agrees with fp32 (Spearman above); accuracy is the Scorers'
            scorer = scorers[name.removeprefix("scorer-")]
            acc = accuracy(score(heldout))
            fp32_accuracy = acc if fp32_accuracy is None else fp32_accuracy
            record |= {
                "heldout_pairs": len(heldout) // 2, "heldout_accuracy": round(acc, 2),
                "accuracy_vs_fp32_points": round(acc - fp32_accuracy, 2),
                "batch_spread": float(f"{batch_spread(scorer, items[:32]):.2g}"),
            }  # fmt: skip
        records.append(emit(record, args.json))
    return records


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench offline", description=__doc__)
    add_args(parser)
    run(parser.parse_args(argv))
